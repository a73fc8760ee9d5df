"""What a user of `pyflyte run` sees: bad config fields fail at once in one line, a user error is a message and not
a traceback, and Ctrl-C tells where the last checkpoint is and the exact command that resumes it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from nanochat_flyte.config import RunConfig
from tests.helpers import interrupted_after_a_save
from tests.shard_server import serve_shards, write_fineweb_shards
from tests.test_workflow import VAL_SHARD, interruptible_run, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PYFLYTE = [sys.executable, "-m", "flytekit.clis.sdk_in_container.pyflyte", "run", "workflows/nanochat.py", "main"]


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "NANOCHAT_FLYTE_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}


def pyflyte(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*PYFLYTE, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("form", ["inline JSON", "YAML file"])
def test_a_misspelt_field_stops_pyflyte_run_with_one_message(tmp_path, env, form):
    value = '{"num_iteration": 40}'
    if form == "YAML file":
        value = str(tmp_path / "preset.yaml")
        (tmp_path / "preset.yaml").write_text("depth: 2\nnum_iteration: 40\n")
    result = pyflyte("--config", value, env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "RunConfig.num_iteration: unknown field; did you mean num_iterations?" in output
    assert "Traceback" not in output and "Running Execution" not in output  # refused before anything ran


def test_a_chat_preset_file_may_say_humaneval_off(tmp_path, env):
    # `off` is the word, as YAML 1.2 reads it (and as ChatConfig takes a YAML 1.1 reader's False); the next bad field
    # shows `off` got through
    (tmp_path / "chat.yaml").write_text("humaneval: off\neval_tasks: ''\n")
    result = subprocess.run([*PYFLYTE[:-2], "workflows/chat.py", "nanochat_chat", "--chat_config",
                             str(tmp_path / "chat.yaml")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "ChatConfig.eval_tasks: no task given" in output and "ChatConfig.humaneval" not in output


def test_an_unreachable_data_url_is_one_message_not_a_traceback(env):
    config = tiny_config("http://127.0.0.1:9/no-mirror").to_dict()
    result = pyflyte("--config", json.dumps(config), env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "RunConfig.data_url: 'http://127.0.0.1:9/no-mirror' is unreachable" in output
    assert "Connection refused" in output
    # one plain line, copyable: no box around it, no URL split across lines
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 2 and len(error_lines) == 1 and "http://127.0.0.1:9/no-mirror/shard_00000.parquet" \
        in error_lines[0] and "│" not in result.stderr


def test_a_partial_config_changes_the_workflows_own_default_as_flyte_run_does(tmp_path):
    """nanochat_d12_a100 --config '{"num_iterations": 100}' is the depth-12 preset for 100 steps, not a depth-8 run
    (pyflyte hands the type the workflow's default input as JSON, as click's parameter default)."""
    from workflows.presets import D12_CONFIG
    from workflows.support import JsonParamType

    d12_default = click.Option(["--config"], default=json.dumps(D12_CONFIG.to_dict()))
    config = JsonParamType(RunConfig).convert('{"num_iterations": 100}', d12_default, None)
    assert (config.depth, config.max_seq_len, config.num_iterations) == (12, 1024, 100)
    (tmp_path / "short.yaml").write_text("num_iterations: 100\n")
    assert JsonParamType(RunConfig).convert(str(tmp_path / "short.yaml"), d12_default, None) == config
    main_default = click.Option(["--config"], default=json.dumps(RunConfig().to_dict()))
    assert JsonParamType(RunConfig).convert('{"num_iterations": 100}', main_default, None) == RunConfig(
        num_iterations=100)


def test_pyflyte_reads_a_preset_file_as_the_library_does(tmp_path):
    from workflows.support import JsonParamType

    option = click.Option(["--config"], default=json.dumps(RunConfig().to_dict()))
    (tmp_path / "run.yaml").write_text("run_name: 2024-06-01\nmatrix_lr: 1e-3\nseed: 010\n")  # YAML 1.2's values
    config = JsonParamType(RunConfig).convert(str(tmp_path / "run.yaml"), option, None)
    assert (config.run_name, config.matrix_lr, config.seed) == ("2024-06-01", 0.001, 10)
    (tmp_path / "bad.yaml").write_text("num_iterations: [40\n")
    with pytest.raises(click.BadParameter, match=r"^RunConfig\.\*: '.*bad.yaml' is not a YAML document: while parsing"):
        JsonParamType(RunConfig).convert(str(tmp_path / "bad.yaml"), option, None)


def test_a_misspelt_preset_path_says_the_file_is_missing(env):
    result = pyflyte("--config", "configs/smok.yaml", env=env)
    output = " ".join((result.stdout + result.stderr).replace("│", " ").split())
    assert result.returncode == 2 and "Running Execution" not in output
    assert "no preset file 'configs/smok.yaml'" in output and "valid json" not in output


def test_ctrl_c_prints_the_resume_command_and_that_command_resumes(tmp_path, env):
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        run_json = interruptible_run(tmp_path / "run.json", server.url)
        returncode, lines = interrupted_after_a_save([*PYFLYTE, "--config", str(run_json)], ROOT, env,
                                                     "step 00002 | saved checkpoint to ")
        output = "".join(lines)
        assert returncode != 0, output[-3000:]
        interrupted = next(line for line in lines if line.startswith("interrupted at step "))
        assert "the last checkpoint (step 2) is in " in interrupted, output[-3000:]
        command = next(line for line in lines if line.startswith("resume with: ")).removeprefix("resume with: ")
        assert command.startswith("pyflyte run workflows/nanochat.py main --config ")

        arguments = command.split()[2:]  # after "pyflyte run": the workflow file, main, --config ..., --resume_from ...
        resumed = subprocess.run([*PYFLYTE[:-2], *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ") and "/00008" in line]
    assert steps[0] == "00003/00008" and steps[-1] == "00008/00008"  # continued after step 2, to the end
    assert "resuming from " in resumed.stdout
