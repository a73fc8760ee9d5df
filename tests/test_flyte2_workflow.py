"""The Flyte 2 front's pipelines in Flyte 2's local mode (`flyte.with_runcontext(mode="local")`, what
`flyte run --local` runs), against the shards and hub the flytekit tests serve from 127.0.0.1: the same outputs as
workflows/'s, and the same one-line refusal of a bad input, before any download."""

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import flyte
import flyte.errors
import pytest
from flyte.io import Dir
from obstore.exceptions import GenericError, NotFoundError
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

import workflows.flyte2.support as support
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation import chat_eval
from nanochat_flyte.pipeline.train import OWNER_FILE
from tests.helpers import make_data_dir
from tests.helpers import tiny_config as tiny_training_config
from tests.shard_server import serve_shards, write_fineweb_shards
from tests.test_chat_workflow import (
    check_chat_pipeline_outputs,
    check_rl_pipeline_outputs,
    rl_pipeline_inputs,
    tiny_chat_config,
)
from tests.test_workflow import (  # noqa: F401 - served_shards and private_shard_cache are fixtures
    VAL_SHARD,
    check_e2e_outputs,
    e2e_config,
    private_shard_cache,
    served_shards,
    tiny_config,
)
from workflows.flyte2.chat import chat_sft, nanochat_chat, nanochat_chat_rl
from workflows.flyte2.nanochat import main
from workflows.flyte2.pretraining import describe_training_node, train_base_model
from workflows.flyte2.scale_up import nanochat_d12_8xa100

LOCAL_METADATA = Path("/tmp/flyte/metadata")  # where local mode keeps each run's metadata and task reports


class LocalRuns:
    """Runs tasks as `flyte run --local` does, with their outputs under one folder and no cache (a cached output
    would point into an earlier test's deleted folder)."""

    def __init__(self, raw_data_path: Path):
        self.raw_data_path, self.names = raw_data_path, []
        flyte.init()

    def __call__(self, task, **inputs) -> tuple:
        self.names.append(f"test-{uuid.uuid4().hex[:12]}")
        return flyte.with_runcontext(mode="local", name=self.names[-1], raw_data_path=str(self.raw_data_path),
                                     disable_run_cache=True).run(task, **inputs).outputs()

    def report_cards(self) -> str:
        """Every task report of these runs (report.html, beside each action's outputs), as one text."""
        return "".join(path.read_text() for name in self.names for path in (LOCAL_METADATA / name).rglob("report.html"))


@pytest.fixture
def run_locally(tmp_path):
    runs = LocalRuns(tmp_path / "raw")
    yield runs
    for name in runs.names:
        shutil.rmtree(LOCAL_METADATA / name, ignore_errors=True)


def test_main_runs_end_to_end_with_the_flytekit_fronts_outputs(served_shards, run_locally,  # noqa: F811
                                                                monkeypatch):
    mapped, map_tasks = [], flyte.map.aio

    def recorded_map(task, items, **options):
        mapped.append((task.func.name, len(items), options["concurrency"]))
        return map_tasks(task, items, **options)

    monkeypatch.setattr(flyte.map, "aio", recorded_map)
    results, checkpoint, report = run_locally(main, config=e2e_config(served_shards))
    check_e2e_outputs(results, Path(checkpoint.path), Path(report.path))
    assert mapped == [("nanochat_data.prepare_data_shard", 3, 8)]  # one action per shard, 8 at once
    assert isinstance(checkpoint, Dir) and isinstance(report, Dir)
    cards = run_locally.report_cards()  # v1's decks, as task report tabs
    for tab in ("Environment", "Data", "Training", "CORE"):
        assert f">{tab}<" in cards, tab
    assert "data:image/png;base64," in cards  # the plots, inlined


def test_nanochat_chat_runs_end_to_end_on_the_local_hub(tmp_path, hub_server, run_locally):
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        results, base_checkpoint, _, chat_results, chat_checkpoint, chat_report = run_locally(
            nanochat_chat, config=tiny_config(server.url), chat_config=tiny_chat_config())
    check_chat_pipeline_outputs(results, chat_results, Path(chat_checkpoint.path), Path(chat_report.path))
    assert ">Chat evaluation<" in run_locally.report_cards()
    # chat_sft continues that SFT run (4 steps) to 6; a base checkpoint is no SFT run to continue
    resumed, resumed_results, _ = run_locally(chat_sft, base_checkpoint=base_checkpoint,
                                              config=tiny_chat_config(num_iterations=6),
                                              resume_from=chat_checkpoint.path)
    assert resumed_results["sft"]["steps_completed"] == 6
    steps = [row["step"] for row in map(json.loads, (Path(resumed.path) / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(Exception, match=r"chat_sft\.resume_from: .* is a checkpoint of the base stage"):
        run_locally(chat_sft, base_checkpoint=base_checkpoint, config=tiny_chat_config(),
                    resume_from=base_checkpoint.path)


def test_nanochat_chat_rl_runs_end_to_end_on_the_local_hub(tmp_path, hub_server, run_locally):
    write_fineweb_shards(tmp_path / "shards", [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(tmp_path / "shards") as server:
        outputs = run_locally(nanochat_chat_rl, **rl_pipeline_inputs(server.url))
    check_rl_pipeline_outputs(*outputs)


def test_a_chat_stage_checks_its_sandbox_on_the_node_kind_that_evaluates(run_locally, monkeypatch):
    """The driver checks a chat stage's inputs; the GPU node kind, where the evaluation will run, checks that it
    can run model-written code in the sandbox, before any training."""
    monkeypatch.setattr(chat_eval, "sandbox_available", lambda: (False, "no user namespaces"))
    with pytest.raises(Exception, match=r"ChatConfig\.humaneval: on, but the sandbox .*: no user namespaces"):
        run_locally(describe_training_node, printed=False, sandbox_for="ChatConfig")


def test_a_data_directory_that_is_not_there_is_one_line(tmp_path, run_locally):
    """(A cached output whose folder is gone is a cache miss: tests/test_flyte2_cli.py.)"""
    gone = tmp_path / "data"
    with pytest.raises(Exception, match=rf"{gone}: no such folder"):
        run_locally(train_base_model, config=tiny_training_config(), data=Dir(path=str(gone)), environment={},
                    resume_from="")


def test_a_lost_training_attempt_resumes_from_its_last_save(tmp_path, monkeypatch, run_locally, capfd):
    """The first attempt is lost right after its first save (step 3 of 6), to a storage hiccup (a preempted node
    is the platform's to retry, which a local run cannot show); Flyte retries the task, and the retry goes on from
    that save through Flyte 2's intra-task checkpoint."""
    save, preempted = support.FlyteAttempts.save, []

    def save_then_preempt(self, checkpoint_dir):
        save(self, checkpoint_dir)
        if not preempted:
            preempted.append(checkpoint_dir)
            raise ConnectionResetError("the storage connection dropped")

    monkeypatch.setattr(support.FlyteAttempts, "save", save_then_preempt)
    data = make_data_dir(tmp_path / "data")
    checkpoint, summary = run_locally(train_base_model, config=tiny_training_config(), data=Dir(path=str(data)),
                                      environment={}, resume_from="")
    assert summary["status"] == "completed" and summary["steps_completed"] == 6
    assert "resuming from the previous attempt's checkpoint" in capfd.readouterr().out
    steps = [row["step"] for row in map(json.loads, (Path(checkpoint.path) / "metrics.jsonl").open())
             if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-3 from the lost attempt, none twice
    assert Path(checkpoint.path) != preempted[0]
    assert not (Path(checkpoint.path) / OWNER_FILE).exists()  # the attempts' bookkeeping stays theirs


def test_a_drivers_independent_steps_overlap_on_a_cluster_and_run_in_order_locally(monkeypatch, recwarn):
    """support.concurrently: each step here waits for the other to have started, which only overlapping steps
    survive, and a failure cancels the steps still running; locally the same steps run one after another, and after a
    failure the unstarted ones are closed."""
    started = {"sft": asyncio.Event(), "core": asyncio.Event()}

    async def waiting_step(name, other):
        started[name].set()
        await asyncio.wait_for(started[other].wait(), timeout=5)
        return name

    monkeypatch.setattr(support, "is_local_run", lambda: False)
    overlapping = support.concurrently(waiting_step("sft", "core"), waiting_step("core", "sft"))
    assert asyncio.run(overlapping) == ["sft", "core"]
    cancelled = []

    async def long_step():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("sft")
            raise

    async def failing_step():
        await asyncio.sleep(0)
        raise ConfigError("core_max_per_task", "must be >= 1")

    async def first_failure_stops_the_rest():  # as a flytekit workflow fails, before the driver goes on
        with pytest.raises(ConfigError):
            await support.concurrently(long_step(), failing_step())
        return list(cancelled)

    assert asyncio.run(first_failure_stops_the_rest()) == ["sft"]

    monkeypatch.setattr(support, "is_local_run", lambda: True)
    order = []

    async def step(name, fail=False):
        order.append(name)
        if fail:
            raise ConfigError("depth", "must be >= 1")
        return name

    assert asyncio.run(support.concurrently(step("data"), step("node"))) == ["data", "node"]
    with pytest.raises(ConfigError):
        asyncio.run(support.concurrently(step("a"), step("b", fail=True), step("never")))
    assert order == ["data", "node", "a", "b"]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_bug_is_not_retried_and_a_storage_hiccup_is():
    """Flyte 2 would retry any error; as under flytekit, only what another attempt can mend is."""
    calls = []

    @support.retried_only_on_storage_errors
    def task(error):
        calls.append(error)
        raise error

    with pytest.raises(flyte.errors.NonRecoverableError, match="^KeyError: 'step'"):
        task(KeyError("step"))
    # a reset connection: requests' OSError, or obstore's GenericError as Flyte 2 moves files on s3:// and gs://
    for passed_on in (ConnectionResetError("reset"), GenericError("connection reset by peer"),
                      ConfigError("depth", "must be >= 1")):
        with pytest.raises(type(passed_on)):
            task(passed_on)
    with pytest.raises(flyte.errors.NonRecoverableError):  # a missing object is not found by a retry either
        task(NotFoundError("no such key"))


@pytest.mark.parametrize("changes, field", [
    (dict(depth=0), "depth"),
    (dict(total_batch_size=500), "total_batch_size"),
    (dict(tokenizer="wordpiece"), "tokenizer"),
])
def test_a_bad_config_fails_main_in_one_line_before_any_download(served_shards, run_locally, changes,  # noqa: F811
                                                                 field):
    served_shards.requests.clear()
    with pytest.raises(Exception, match=rf"RunConfig\.{field}: ") as failure:
        run_locally(main, config=tiny_config(served_shards.url, **changes))
    assert "\n" not in str(failure.value)
    assert served_shards.requests == []


def test_the_eight_gpu_run_checks_its_batch_for_eight_gpus_before_any_download(served_shards,  # noqa: F811
                                                                                run_locally):
    served_shards.requests.clear()
    with pytest.raises(Exception, match=r"RunConfig\.total_batch_size: 512 is not divisible by .* x 8 = 2048"):
        run_locally(nanochat_d12_8xa100, config=tiny_config(served_shards.url))
    assert served_shards.requests == []


def test_a_missing_checkpoint_or_bundle_fails_main_before_any_download(served_shards, hub_server,  # noqa: F811
                                                                     run_locally):
    served_shards.requests.clear()
    with pytest.raises(Exception, match=r"main\.resume_from: /no/such/checkpoint is not a checkpoint directory"):
        run_locally(main, config=tiny_config(served_shards.url), resume_from="/no/such/checkpoint")
    with pytest.raises(Exception, match=r"nanochat_chat\.resume_from: /no/such/checkpoint is not a checkpoint"):
        run_locally(nanochat_chat, config=tiny_config(served_shards.url), chat_config=tiny_chat_config(),
                    resume_from="/no/such/checkpoint")  # a pipeline's pretraining continues it as main's does
    with pytest.raises(Exception, match=r"RunConfig\.eval_bundle_url: .*not found"):
        run_locally(main, config=tiny_config(served_shards.url, eval_bundle_url=served_shards.url + "/no_bundle.zip"))
    assert {request.method for request in served_shards.requests} == {"HEAD"}  # probes only


def test_an_unreachable_data_url_fails_main(run_locally):
    with pytest.raises(Exception, match=r"RunConfig\.data_url: .*unreachable"):
        run_locally(main, config=tiny_config("http://127.0.0.1:9/no-such-mirror"))


def test_a_base_checkpoint_that_is_not_one_fails_chat_sft_before_any_gpu_time(tmp_path, hub_server, run_locally):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"chat_sft\.base_checkpoint: .* is not a checkpoint directory"):
        run_locally(chat_sft, base_checkpoint=Dir(path=str(tmp_path / "empty")), config=tiny_chat_config())
    assert hub_server.requests == []



def worker_failure(tmp_path: Path, error: BaseException) -> ChildFailedError:
    """What torch elastic reports when a worker raised `error`: its error file, as the worker's @record writes it."""
    error_file = tmp_path / f"error_{uuid.uuid4().hex}.json"
    os.environ["TORCHELASTIC_ERROR_FILE"] = str(error_file)
    try:
        try:
            raise error
        except BaseException as raised:
            ErrorHandler().record_exception(raised)
    finally:
        del os.environ["TORCHELASTIC_ERROR_FILE"]
    return ChildFailedError("train", {0: ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))})


def test_a_user_error_in_an_elastic_worker_fails_the_task_in_one_line_and_is_not_retried(tmp_path, monkeypatch):
    """The 8-GPU task runs its body in torch elastic's workers; flyteplugins-pytorch reports any worker's failure as
    a RuntimeError, which Flyte retries. A worker's NonRecoverableError (one_line_user_errors' user error, or the
    bug retried_only_on_storage_errors made one) is the task's one line instead, not retried, as under v1's plugin;
    any other failure (a storage error, a worker killed) stays the plugin's retried failure."""
    def plugin_reporting(failure: ChildFailedError):
        async def execute(self, *args, **kwargs):  # as flyteplugins-pytorch's execute ends when a worker failed
            raise RuntimeError("PyTorch worker(s) failed: ...") from failure
        return execute

    task = flyte.TaskEnvironment(name="elastic_errors", plugin_config=support.ElasticUserErrors(
        nnodes=1, nproc_per_node=2)).task(retries=3)(lambda: 0)
    assert isinstance(task, support.ElasticUserErrorsTask)
    user_error = flyte.errors.NonRecoverableError("RunConfig.depth: must be >= 1, got 0", code="ConfigError")
    monkeypatch.setattr(support.TorchFunctionTask, "execute", plugin_reporting(worker_failure(tmp_path, user_error)))
    with pytest.raises(flyte.errors.NonRecoverableError, match=r"^RunConfig\.depth: must be >= 1, got 0$"):
        asyncio.run(task.execute())
    monkeypatch.setattr(support.TorchFunctionTask, "execute",
                        plugin_reporting(worker_failure(tmp_path, ConnectionResetError("a storage hiccup"))))
    with pytest.raises(RuntimeError, match="PyTorch worker"):
        asyncio.run(task.execute())
