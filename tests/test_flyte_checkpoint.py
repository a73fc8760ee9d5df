"""A preempted train_base_model attempt resumes from Flyte's intra-task checkpoint (flytekit's SyncCheckpoint).

Flyte hands attempt N the checkpoint that attempt N-1 saved, and only that one: each attempt must re-save what
it restored before it trains, or a second preemption would lose it.
"""

import json
from types import SimpleNamespace

import diskcache
import pytest
from flytekit.core.checkpointer import SyncCheckpoint
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.core.local_cache import LocalTaskCache
from flytekit.exceptions.system import FlyteDownloadDataException
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.models.core.types import BlobType
from flytekit.models.literals import Blob, BlobMetadata, Literal, LiteralMap, Primitive, Scalar
from flytekit.types.directory import FlyteDirectory

import workflows.nanochat as wf
import workflows.support as support
from tests.helpers import make_data_dir, tiny_config


class Preempted(Exception):
    pass


class PreemptedAfterFirstSave(SyncCheckpoint):
    """The spot node disappears right after the first checkpoint upload."""

    def save(self, path):
        super().save(path)
        raise Preempted


class NoSecrets:
    def get(self, group, key):
        raise ValueError(f"no secret {group}/{key}")  # what flytekit raises for a secret that is not there


def run_attempt(tmp_path, monkeypatch, attempt: int, checkpoint: SyncCheckpoint):
    """train_base_model's body in a pod of its own, with the intra-task checkpoint Flyte would give it."""
    context = SimpleNamespace(checkpoint=checkpoint, working_directory=str(tmp_path / f"pod{attempt}"),
                              secrets=NoSecrets())
    monkeypatch.setattr(wf, "current_context", lambda: context)
    monkeypatch.setattr(support, "current_context", lambda: context)
    return wf.train_base_model.task_function(config=tiny_config(), data=FlyteDirectory(str(tmp_path / "data")),
                                             environment={}, resume_from="")


def steps_logged(checkpoint_dir):
    return [row["step"] for row in map(json.loads, (checkpoint_dir / "metrics.jsonl").open()) if "train/loss" in row]


def test_a_preempted_attempt_resumes_from_the_previous_attempts_checkpoint(tmp_path, monkeypatch):
    make_data_dir(tmp_path / "data")
    saved = {attempt: tmp_path / f"flyte-checkpoint-{attempt}" for attempt in range(3)}

    with pytest.raises(Preempted):  # attempt 0: trains 3 of 6 steps, saves, is preempted
        run_attempt(tmp_path, monkeypatch, 0, PreemptedAfterFirstSave(str(saved[0])))
    assert json.loads((saved[0] / "training_state.json").read_text())["steps_completed"] == 3

    with pytest.raises(Preempted):  # attempt 1: restores, re-saves at once, and is preempted by that save
        run_attempt(tmp_path, monkeypatch, 1, PreemptedAfterFirstSave(str(saved[1]), str(saved[0])))
    assert (saved[1] / "checkpoint.pt").read_bytes() == (saved[0] / "checkpoint.pt").read_bytes()

    checkpoint, summary = run_attempt(tmp_path, monkeypatch, 2, SyncCheckpoint(str(saved[2]), str(saved[1])))
    assert summary["status"] == "completed" and summary["steps_completed"] == 6
    assert steps_logged(tmp_path / "pod2" / "checkpoint") == [1, 2, 3, 4, 5, 6]  # 1-3 from attempt 0, none twice
    assert (saved[2] / "checkpoint.pt").exists()  # the final save reached Flyte's checkpoint too


def test_an_attempt_after_one_that_never_saved_starts_fresh(tmp_path, monkeypatch):
    """Flyte gives a retry the previous attempt's checkpoint prefix whether or not that attempt saved anything (a
    preemption during the data download, or before the first save_every steps): the retry starts over."""
    make_data_dir(tmp_path / "data")
    never_saved = tmp_path / "flyte-checkpoint-0"
    _, summary = run_attempt(tmp_path, monkeypatch, 1, SyncCheckpoint(str(tmp_path / "flyte-checkpoint-1"),
                                                                      str(never_saved)))
    assert summary["steps_completed"] == 6 and summary["status"] == "completed"


def test_a_first_attempt_starts_fresh(tmp_path, monkeypatch):
    make_data_dir(tmp_path / "data")
    checkpoint, summary = run_attempt(tmp_path, monkeypatch, 0, SyncCheckpoint(str(tmp_path / "flyte-checkpoint")))
    assert summary["steps_completed"] == 6
    assert steps_logged(tmp_path / "pod0" / "checkpoint") == [1, 2, 3, 4, 5, 6]


def failed_download(cause: Exception) -> Exception:
    """What flytekit raises when an input's download fails: its own exception, raised while handling the store's."""
    remote = FileAccessProvider(local_sandbox_dir="/tmp", raw_output_prefix="/tmp")

    def failing_get(*args, **kwargs):
        raise cause

    remote.get = failing_get
    try:
        remote.get_data("s3://bucket/data", "/tmp/nowhere", is_multipart=True)
    except Exception as error:
        return error
    raise AssertionError("the download did not fail")


@pytest.mark.parametrize("error, retried", [
    (ConnectionResetError("reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (FileNotFoundError("no checkpoint there"), False),  # the user's: another attempt would not find it either
    (ZeroDivisionError("a bug"), False),
    ("download", True),  # an input's download reset mid-way: flytekit's FlyteDownloadDataException, no OSError
])
def test_a_storage_or_network_hiccup_is_retried_and_nothing_else(error, retried):
    if error == "download":
        error = failed_download(ConnectionResetError("reset by peer"))
        assert isinstance(error, FlyteDownloadDataException) and not isinstance(error, OSError)
    with pytest.raises(Exception) as raised:
        with support.retried_on_storage_errors():
            raise error
    assert isinstance(raised.value, FlyteRecoverableException) == retried
    if not retried:
        assert raised.value is error


def test_a_cached_local_output_whose_folder_is_gone_is_a_miss(tmp_path, monkeypatch, capsys):
    """flytekit's local cache outlives the folders under $TMPDIR it points into (a reboot clears /tmp): such an
    entry is a miss, and the task runs again, instead of a traceback in the next task's input conversion."""
    monkeypatch.setattr(LocalTaskCache, "_cache", diskcache.Cache(str(tmp_path / "local-cache")), raising=False)
    monkeypatch.setattr(LocalTaskCache, "_initialized", True)
    data = tmp_path / "flyte-run" / "data"
    data.mkdir(parents=True)
    directory = Blob(BlobMetadata(BlobType("", BlobType.BlobDimensionality.MULTIPART)), str(data))
    outputs = LiteralMap({"o0": Literal(scalar=Scalar(blob=directory)),
                          "o1": Literal(scalar=Scalar(primitive=Primitive(integer=7)))})
    inputs = LiteralMap({"index": Literal(scalar=Scalar(primitive=Primitive(integer=3)))})
    LocalTaskCache.set("workflows.nanochat.collect_data", "2", inputs, (), outputs)
    assert LocalTaskCache.get("workflows.nanochat.collect_data", "2", inputs, ()) == outputs
    data.rmdir()
    assert LocalTaskCache.get("workflows.nanochat.collect_data", "2", inputs, ()) is None
    assert f"workflows.nanochat.collect_data: cached output {data} is gone: running the task again" in \
        capsys.readouterr().out
