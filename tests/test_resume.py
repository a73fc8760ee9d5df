"""main(resume_from=...): continue or extend a run from its checkpoint, checked before any GPU time; save_to keeps a
copy where the user chose; a CORE failure after training loses nothing."""

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import fsspec
import pytest
from obstore.exceptions import GenericError, InvalidPathError, UnauthenticatedError

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data import download
from nanochat_flyte.data.download import probe
from nanochat_flyte.errors import ConfigError, is_credentials_error, is_storage_error, user_message
from nanochat_flyte.model.checkpoint import CHECKPOINT_FILE, check_save_to
from nanochat_flyte.pipeline.setup import sft_start, stage_resume
from nanochat_flyte.pipeline.train import last_save, resume_command, stage_resume_command
from nanochat_flyte.training.resume import check_base_resume
from tests.shard_server import serve_shards, write_fineweb_shards
from tests.test_workflow import VAL_SHARD, tiny_config
from workflows.nanochat import main


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_fineweb_shards(directory, [0, 1, VAL_SHARD], docs_per_shard=150)
    with zipfile.ZipFile(directory / "no_core_yaml.zip", "w") as bundle:  # a zip, but not a bundle
        bundle.writestr("eval_bundle/README.txt", "not a bundle")
    with serve_shards(directory) as server:
        yield server


@pytest.fixture(scope="module")
def finished(served, tmp_path_factory):
    """A finished 6-step run, copied to save_to."""
    save_to = tmp_path_factory.mktemp("runs") / "first"
    config = tiny_config(served.url, num_iterations=6, eval_every=3, sample_every=6, save_every=3,
                         warmdown_ratio=0.3, save_to=str(save_to))
    results, checkpoint, report = main(config=config)
    return config, results, Path(checkpoint.path), save_to


def rows(checkpoint_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]


def test_save_to_holds_the_checkpoint_the_report_and_the_results(finished):
    _, results, _, save_to = finished
    for name in ("checkpoint.pt", "config.json", "training_state.json", "tokenizer/tokenizer.tiktoken", "report.md",
                 "results.json", "metrics.jsonl"):
        assert (save_to / name).is_file(), name
    assert json.loads((save_to / "results.json").read_text())["training"]["steps_completed"] == 6


def test_a_finished_run_is_extended_and_its_learning_rate_warms_down_again(finished):
    """...at the rates of the new config (a resumed optimizer keeps its moments, not its old settings)."""
    config, _, _, save_to = finished
    results, checkpoint, _ = main(config=tiny_config(config.data_url, num_iterations=10, eval_every=3,
                                                     sample_every=10, save_every=3, warmdown_ratio=0.3,
                                                     matrix_lr=2 * config.matrix_lr, run_name=""),
                                  resume_from=str(save_to))
    assert results["training"]["steps_completed"] == 10
    assert results["training"]["run_name"] == config.run_name  # no name given: the resumed run's (its W&B run)
    train_rows = [row for row in rows(Path(checkpoint.path)) if "train/loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 11))  # steps 1-6 came with the checkpoint
    lrm = {row["step"]: row["train/lrm"] for row in train_rows}
    # warmdown_ratio 0.3: the last 2 of 6 steps warmed down; of 10 steps, the last 3, so step 7 is flat again
    assert lrm[6] < 1.0 and lrm[7] == 1.0
    assert lrm[10] < 1.0
    matrix_lr = {row["step"]: row["train/lr_matrix"] for row in train_rows}
    assert matrix_lr[5] == config.matrix_lr and matrix_lr[7] == 2 * config.matrix_lr


@pytest.mark.parametrize("changes, message", [
    (dict(depth=2), r"RunConfig\.depth: 2 differs from 1 in the checkpoint being resumed"),
    (dict(num_iterations=4), r"RunConfig\.num_iterations: 4 is fewer than the 6 steps"),
    (dict(seed=7), r"RunConfig\.seed: 7 differs from 42"),
    (dict(residual_scalars=True), r"RunConfig\.residual_scalars: True differs from False"),
    (dict(tokenizer="bpe", bpe_train_chars=10**6), r"RunConfig\.tokenizer: 'bpe' differs from 'gpt2'"),
])
def test_an_incompatible_resume_is_refused_before_anything_runs(finished, changes, message):
    config, _, _, save_to = finished
    with pytest.raises(ConfigError, match=message):
        check_base_resume(tiny_config(config.data_url, **changes), str(save_to))


def test_a_gpt2_run_resumes_whatever_its_bpe_fields_say(finished):
    config, _, _, save_to = finished
    check_base_resume(tiny_config(config.data_url, num_iterations=8, bpe_train_chars=10**6, bpe_vocab_size=512),
                 str(save_to))


def test_the_same_data_folder_written_another_way_is_the_same_data(tmp_path):
    """(A trailing slash or file:// was refused as other data; the data check after it already knew better.)"""
    data = tmp_path / "shards"
    data.mkdir()
    config = tiny_config(str(data), num_iterations=6)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "training_state.json").write_text(json.dumps({"phase": "base", "steps_completed": 3}))
    (tmp_path / "model_config.json").write_text("{}")
    for same in (f"{data}/", f"file://{data}", f"{data}/../shards"):
        check_base_resume(dataclasses.replace(config, data_url=same), str(tmp_path))
    with pytest.raises(ConfigError, match=r"^RunConfig\.data_url: .* differs from .* in the checkpoint"):
        check_base_resume(dataclasses.replace(config, data_url=str(tmp_path / "other")), str(tmp_path))


def test_with_only_needed_shards_a_resume_keeps_its_total_batch_size(tmp_path):
    """only_needed_shards prepares the shards of num_iterations * total_batch_size tokens: another total_batch_size
    would prepare other shards, and so another data stream than the one the checkpoint's position is in."""
    config = tiny_config("http://127.0.0.1:9", only_needed_shards=True, num_iterations=6)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "training_state.json").write_text(json.dumps({"phase": "base", "steps_completed": 3}))
    (tmp_path / "model_config.json").write_text("{}")
    check_base_resume(config, str(tmp_path))
    with pytest.raises(ConfigError, match=r"^RunConfig\.total_batch_size: a run prepared with only_needed_shards "
                                          rf"keeps its total_batch_size \({config.total_batch_size}\): its data"):
        check_base_resume(dataclasses.replace(config, total_batch_size=2 * config.total_batch_size), str(tmp_path))


def test_pretraining_does_not_continue_a_chat_checkpoint(finished, tmp_path):
    config, _, _, save_to = finished
    shutil.copytree(save_to, tmp_path / "chat")
    state = json.loads((tmp_path / "chat" / "training_state.json").read_text())
    (tmp_path / "chat" / "training_state.json").write_text(json.dumps(state | {"phase": "chat", "stage": "chat"}))
    with pytest.raises(ConfigError, match=r"main\.resume_from: .* is a chat checkpoint; pretraining continues a base"):
        check_base_resume(tiny_config(config.data_url, num_iterations=8), str(tmp_path / "chat"))


def test_a_checkpoint_older_than_a_config_field_resumes_with_its_default(finished, tmp_path):
    config, _, _, save_to = finished
    shutil.copytree(save_to, tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["residual_scalars"]  # written before the field existed: it had the original model
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    check_base_resume(tiny_config(config.data_url, num_iterations=8), str(tmp_path / "old"))
    with pytest.raises(ConfigError, match=r"RunConfig\.residual_scalars: True differs from False"):
        check_base_resume(tiny_config(config.data_url, num_iterations=8, residual_scalars=True), str(tmp_path / "old"))


def test_resume_from_a_folder_without_a_checkpoint_fails_in_setup(served, tmp_path):
    served.requests.clear()
    with pytest.raises(Exception, match=r"main\.resume_from: .* is not a checkpoint directory"):
        main(config=tiny_config(served.url), resume_from=str(tmp_path))
    assert served.requests == []  # checked before the shards were even probed


def test_a_broken_bundle_at_a_url_is_refused_before_training(served, tmp_path):
    """(It failed after training, which the checkpoint outlived: evaluate.base_model still says so, for a bundle that
    breaks after the checks, tests/test_core_eval.py.)"""
    save_to = tmp_path / "kept"
    config = tiny_config(served.url, num_iterations=2, eval_every=2, sample_every=2, save_every=2,
                         eval_bundle_url=served.url + "/no_core_yaml.zip", save_to=str(save_to))
    served.requests.clear()
    with pytest.raises(Exception, match=r"no_core_yaml\.zip: no single core\.yaml in the bundle \(there or one "
                                        r"folder down\)$"):
        main(config=config)
    assert not (save_to / "checkpoint.pt").exists()
    assert {request.path for request in served.requests if request.method == "GET"} == {"/no_core_yaml.zip"}


def test_an_interrupted_run_resumes_from_its_local_copy_or_its_own_folder(tmp_path):
    """The Ctrl-C resume line names the save_to copy where it is on this machine (the task's folder may go with the
    task), else the checkpoint folder; nothing before the first save."""
    folder, copy = tmp_path / "task" / "checkpoint", tmp_path / "copy"
    config = tiny_config("http://127.0.0.1:9")
    assert last_save(config, folder) is None
    (folder / CHECKPOINT_FILE).parent.mkdir(parents=True)
    (folder / CHECKPOINT_FILE).touch()
    assert last_save(config, folder) == folder
    for save_to in (str(copy), copy.as_uri()):
        assert last_save(dataclasses.replace(config, save_to=save_to), folder) is None  # the copy has no save yet
    copy.mkdir()
    (copy / CHECKPOINT_FILE).touch()
    for save_to in (str(copy), copy.as_uri()):
        assert last_save(dataclasses.replace(config, save_to=save_to), folder) == copy
    assert last_save(dataclasses.replace(config, save_to="s3://bucket/run"), folder) == folder


def test_the_resume_line_names_a_copy_under_the_working_directory_as_the_user_did(tmp_path, monkeypatch):
    copy = tmp_path / "repo" / "runs" / "my base"
    copy.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    (copy / CHECKPOINT_FILE).touch()
    config = dataclasses.replace(tiny_config("http://127.0.0.1:9"), save_to="runs/my base")
    assert resume_command(config, tmp_path / "task", "pyflyte run workflows/nanochat.py main",
                          "workflows/chat.py").splitlines() == [
        "resume with: pyflyte run workflows/nanochat.py main --config 'runs/my base/config.json' "
        "--resume_from 'runs/my base'",
        "(a pipeline of workflows/chat.py: its command with --config 'runs/my base/config.json' "
        "--resume_from 'runs/my base')"]
    elsewhere = tmp_path / "task"  # a task folder outside the working directory keeps its whole path
    elsewhere.mkdir()
    (elsewhere / CHECKPOINT_FILE).touch()
    assert resume_command(tiny_config("http://127.0.0.1:9"), elsewhere, "nanochat-run", "pipelines.py").endswith(
        f"--resume_from {elsewhere})")
    # a chat stage's: its workflow from the same start checkpoint, continuing its last save
    assert stage_resume_command(ChatConfig(save_to="runs/my base"), tmp_path / "task",
                                "pyflyte run workflows/chat.py", "/data/base run") == (
        "resume with: pyflyte run workflows/chat.py chat_sft --base_checkpoint '/data/base run' --resume_from "
        "'runs/my base', and the same --config")
    assert stage_resume_command(RLConfig(), elsewhere, "flyte run --local workflows/flyte2/chat.py",
                                "s3://b/sft") == ("resume with: flyte run --local workflows/flyte2/chat.py chat_rl "
                                                  f"--sft_checkpoint s3://b/sft --resume_from {elsewhere}, and the "
                                                  "same --config")
    assert stage_resume_command(RLConfig(), tmp_path / "unsaved", "x", "y") is None


class UnreachableStore(fsspec.AbstractFileSystem):
    """An object store as obstore answers without credentials: Flyte 2 makes obstore fsspec's s3:// and gs://, and
    its errors are no OSErrors (they ended `flyte run` in a traceback)."""
    protocol = "unreachable"

    def fail(self, *args, **kwargs):
        raise GenericError("Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token\n"
                           "    source: RetryError(...)")

    exists = info = ls = pipe_file = _open = fail


def test_a_store_that_cannot_be_read_is_one_line_naming_the_field(monkeypatch):
    fsspec.register_implementation("unreachable", UnreachableStore, clobber=True)
    store_error = "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token"
    location = "unreachable://bucket/run"
    with pytest.raises(ConfigError) as error:
        check_base_resume(RunConfig(), location)
    assert str(error.value) == f"main.resume_from: cannot read {location!r}: {store_error}"
    with pytest.raises(ConfigError) as error:
        sft_start(ChatConfig(), location)
    assert str(error.value) == f"chat_sft.base_checkpoint: cannot read {location!r}: {store_error}"
    with pytest.raises(ConfigError) as error:
        check_save_to(location, "RunConfig")
    assert str(error.value) == f"RunConfig.save_to: cannot write to {location!r}: {store_error}"
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    assert probe(f"{location}/shard_00000.parquet") == store_error


def test_obstores_errors_are_sorted_and_said_in_one_line():
    """A network or server error is a hiccup another attempt may mend; an invalid path is not. A refusal is missing
    credentials, said in its first line (the rest is obstore's debugging dump) with the hint."""
    details = "\n\nDebug source:\nUnauthenticated { path: \"x\" }"
    assert is_storage_error(GenericError("Generic S3 error: connection reset" + details))
    assert not is_storage_error(InvalidPathError("Encountered illegal character sequence"))
    refused = UnauthenticatedError("The operation lacked valid authentication credentials for path x" + details)
    assert is_credentials_error(refused) and not is_storage_error(refused)
    assert user_message(refused) == ("The operation lacked valid authentication credentials for path x for an object "
                                     "store URI (s3://, gs://): give this machine its credentials (AWS_PROFILE or "
                                     "AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)")


def test_a_checkpoint_location_with_a_space_at_an_end_is_named_so(tmp_path):
    """It names another folder than the one meant: not "not a checkpoint directory", which sends the user looking."""
    with pytest.raises(ConfigError, match=r"^main\.resume_from: '.*/run ' starts or ends with white space$"):
        check_base_resume(RunConfig(), f"{tmp_path}/run ")
    with pytest.raises(ConfigError, match=r"^chat_sft\.resume_from: ' s3://bucket/chat' starts or ends with white"):
        stage_resume(ChatConfig(), str(tmp_path), " s3://bucket/chat")
