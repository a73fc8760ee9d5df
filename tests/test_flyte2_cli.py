"""What a user of `flyte run` sees, as tests/test_pyflyte_cli.py checks for `pyflyte run`: a bad config field, a
missing preset, an unreachable data URL or a missing checkpoint stops the command with one line, `Error: ...`, and
exit status 2, before anything is downloaded; a good config runs. workflows/flyte2/cli.py makes it so."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import interrupted_after_a_save
from tests.shard_server import serve_shards, write_fineweb_shards
from tests.test_workflow import VAL_SHARD, interruptible_run, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FLYTE = str(Path(sys.executable).with_name("flyte"))  # the `flyte` command beside this interpreter


@pytest.fixture
def flyte_run(tmp_path):
    """`flyte run --local FILE TASK ARGUMENTS` from the repository root, its outputs under tmp_path; HOME empty (flyte's
    local cache is ~/.flyte), DO_NOT_TRACK set (no crash reports to Sentry)."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1", "COLUMNS": "80",
           "NANOCHAT_FLYTE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    names = []

    def command(*arguments: str, file: str = "workflows/flyte2/nanochat.py", task: str = "main") -> list[str]:
        names.append(f"test-{uuid.uuid4().hex[:12]}")
        return [FLYTE, "run", "--local", "--name", names[-1], "--raw-data-path", str(tmp_path / "raw"), file, task,
                *arguments]

    def run(*arguments: str, **where: str) -> subprocess.CompletedProcess:
        return subprocess.run(command(*arguments, **where), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    run.command, run.env = command, env
    yield run
    for name in names:  # the run's metadata and reports, which local mode keeps in /tmp/flyte/metadata
        shutil.rmtree(Path("/tmp/flyte/metadata") / name, ignore_errors=True)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run's only output line that says what went wrong; the command refused, with status 2."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "│" not in output and "Completed" not in output
    (line,) = [line for line in output.splitlines() if "Error" in line]
    return line


@pytest.mark.parametrize("value, problem", [
    ('{"depth": 2', "RunConfig.*: not valid JSON: Expecting ',' delimiter: line 1 column 12 (char 11)"),
    ("[1]", "RunConfig.*: a config is a mapping"),
])
def test_malformed_inline_json_says_so_in_one_line(flyte_run, value, problem):
    assert one_error_line(flyte_run("--config", value)).startswith(f"Error: Invalid value for '--config': {problem}")


@pytest.mark.parametrize("form", ["inline JSON", "YAML file"])
def test_a_misspelt_field_stops_flyte_run_with_one_line(tmp_path, flyte_run, form):
    value = '{"num_iteration": 40}'
    if form == "YAML file":
        value = str(tmp_path / "preset.yaml")
        (tmp_path / "preset.yaml").write_text("depth: 2\nnum_iteration: 40\n")
    line = one_error_line(flyte_run("--config", value))
    assert line == ("Error: Invalid value for '--config': RunConfig.num_iteration: unknown field; did you mean "
                    "num_iterations?")


def test_a_chat_preset_is_read_as_yaml_1_2_and_a_misspelt_path_is_named(tmp_path, flyte_run):
    # `humaneval: off` stays the word "off" (flyte's own reading would make it False); the next bad field shows it
    (tmp_path / "chat.yaml").write_text("humaneval: off\neval_tasks: ''\n")
    line = one_error_line(flyte_run("--chat_config", str(tmp_path / "chat.yaml"),
                                    file="workflows/flyte2/chat.py", task="nanochat_chat"))
    assert "ChatConfig.eval_tasks: no task given" in line
    assert "no preset file 'configs/smok.yaml'" in one_error_line(flyte_run("--config", "configs/smok.yaml"))


def test_an_unreachable_data_url_or_a_missing_checkpoint_is_one_line(tmp_path, flyte_run):
    (tmp_path / "run.json").write_text(json.dumps(tiny_config("http://127.0.0.1:9/no-mirror").to_dict()))
    line = one_error_line(flyte_run("--config", str(tmp_path / "run.json")))
    # the same line as under pyflyte run (tests/test_pyflyte_cli.py): copyable, the URL whole
    assert line.startswith("Error: RunConfig.data_url: 'http://127.0.0.1:9/no-mirror' is unreachable")
    assert "http://127.0.0.1:9/no-mirror/shard_00000.parquet" in line and "Connection refused" in line

    line = one_error_line(flyte_run("--resume_from", str(tmp_path)))  # --config: the reference run by default
    assert line == (f"Error: main.resume_from: {tmp_path} is not a checkpoint directory (no training_state.json and "
                    "config.json)")


def test_flyte_run_local_runs_main(tmp_path, flyte_run):
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        config = tiny_config(server.url, num_iterations=2, eval_every=2, sample_every=2, save_every=2)
        (tmp_path / "run.yaml").write_text(json.dumps(config.to_dict()))  # JSON is YAML
        result = flyte_run("--config", str(tmp_path / "run.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== base model: e2e (completed, 2 steps" in result.stdout
    assert "Completed Local Run" in result.stdout + result.stderr


def test_ctrl_c_prints_the_resume_command_and_that_command_resumes(tmp_path, flyte_run):
    """flyte runs a local task on a worker thread, which sees no KeyboardInterrupt: the line comes at the exit."""
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        run_json = interruptible_run(tmp_path / "run.json", server.url)
        returncode, lines = interrupted_after_a_save(flyte_run.command("--config", str(run_json)), ROOT,
                                                     flyte_run.env, "step 00002 | saved checkpoint to ")
        output = "".join(lines)
        assert returncode == 130 and "Completed" not in output, output[-3000:]
        assert "terminate called" not in output  # the interpreter is not finalized under the training thread
        command = next(line for line in lines if line.startswith("resume with: ")).removeprefix("resume with: ")
        assert command.startswith("flyte run --local workflows/flyte2/nanochat.py main --config "), command

        arguments = command.split()[5:]  # after the task's name: --config ... --resume_from ...
        resumed = flyte_run(*arguments)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ") and "/00008" in line]
    assert steps[0] == "00003/00008" and steps[-1] == "00008/00008"  # continued after step 2, to the end
    assert "resuming from " in resumed.stdout


def test_a_second_local_run_takes_the_data_tasks_output_from_the_cache(flyte_run, tmp_path):
    """As under pyflyte: a relaunch prepares no data twice. (Flyte 2's local runs read only a cache whose behavior
    is "auto"; "override" was written and never read.)"""
    arguments = ("--tokenizer", "gpt2", "--data_url", str(tmp_path / "unused"), "--num_shards", "1",
                 "--bpe_vocab_size", "0", "--bpe_train_chars", "0")
    for _ in range(2):
        result = flyte_run(*arguments, file="workflows/flyte2/pretraining.py", task="prepare_tokenizer")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    made = list((tmp_path / "raw").rglob("tokenizer"))
    assert len(made) == 1, made  # the second run's output is the first's
    # a cached output whose folder is gone (a reboot, a clean-up) is a miss: the task runs again
    shutil.rmtree(made[0])
    again = flyte_run(*arguments, file="workflows/flyte2/pretraining.py", task="prepare_tokenizer")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"local cache: cached output {made[0]} is gone: running the task again" in again.stdout
    assert len(list((tmp_path / "raw").rglob("tokenizer"))) == 1  # the new one
