"""Pretraining's tasks, which nanochat.py, chat.py and scale_up.py share, and `pretrain`, the stages chained: checks
(in the driver) -> the training node described, and the data (CPU, cached, one action per shard), at once ->
training -> CORE -> results. `train_base` and `score_and_report` are its halves: a pipeline starts SFT as soon as the
first ends. Like workflows/nanochat.py, only declarations: the work is in nanochat_flyte.pipeline.
"""

import functools
from typing import NamedTuple

import flyte
from flyte.io import Dir

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.prepare import ShardJob, plan_jobs, prepare_shard
from nanochat_flyte.pipeline import evaluate, prepare, setup, train
from nanochat_flyte.pipeline.finish import finish_base_run
from workflows.flyte2.environments import DATA_CACHE, EVALUATION_CACHE, SHARD_CACHE, data_env, gpu_env
from workflows.flyte2.support import (
    FlyteAttempts,
    concurrently,
    is_local_run,
    local_dir,
    name_wandb_run,
    one_line_user_errors,
    retried_only_on_storage_errors,
    said_at_exit_while_running,
    show_report,
    upload,
    wandb_links,
    work_dir,
)

# What continues a local run stopped with Ctrl-C, up to its inputs (train.resume_command adds them), and the file of
# the pipelines that take the same inputs
RESUME_COMMAND = "flyte run --local workflows/flyte2/nanochat.py main"
PIPELINES_FILE = "workflows/flyte2/chat.py"


class RunOutputs(NamedTuple):
    results: dict  # the results JSON
    checkpoint: Dir  # checkpoint.pt, model_config.json, training_state.json, tokenizer/, metrics, ...
    report: Dir  # report.md with its plots and the CORE table, and results.json


# On the training node kind, so that the report describes the GPU, driver and CPUs the training will get, and a chat
# stage's sandbox is checked where its evaluation runs (sandbox_for: setup.sandbox_required_by), before training.
@gpu_env.task(report=True)
@one_line_user_errors
def describe_training_node(printed: bool = True, sandbox_for: str = "") -> dict:
    return setup.describe_machine(show_report, printed=printed, sandbox_for=sandbox_for)


@data_env.task(cache=DATA_CACHE)
@one_line_user_errors
def prepare_tokenizer(tokenizer: str, data_url: str, num_shards: int, bpe_vocab_size: int, bpe_train_chars: int
                      ) -> Dir:
    """GPT-2's identity, or our own BPE trained on the train shards. Cached: training a BPE takes a while."""
    return upload(prepare.tokenizer(tokenizer, data_url, num_shards, bpe_vocab_size, bpe_train_chars,
                                    work_dir("tokenizer")))


@data_env.task(cache=DATA_CACHE)
@one_line_user_errors
def plan_data_shards(config: RunConfig, tokenizer_dir: Dir) -> list[ShardJob]:
    return plan_jobs(config, local_dir(tokenizer_dir))  # with only_needed_shards, shard 0 is downloaded here


# No retries: download_shard retries with backoff itself; a preempted pod is the platform's to retry.
@data_env.task(cache=SHARD_CACHE, interruptible=True)
@one_line_user_errors
def prepare_data_shard(job: ShardJob, tokenizer_dir: Dir) -> Dir:
    out_dir = work_dir(job.name)
    prepare_shard(job, local_dir(tokenizer_dir), out_dir)
    return upload(out_dir)


@data_env.task(cache=DATA_CACHE, report=True)
@one_line_user_errors
def collect_data(config: RunConfig, parts: list[Dir], tokenizer_dir: Dir) -> tuple[Dir, dict]:
    out_dir = work_dir("data")
    manifest = prepare.collect_data(config, [local_dir(part) for part in parts], local_dir(tokenizer_dir), out_dir,
                                    show_report)
    return upload(out_dir), manifest


@gpu_env.task(retries=3, report=True, links=wandb_links())
@one_line_user_errors
@retried_only_on_storage_errors
def train_base_model(config: RunConfig, data: Dir, environment: dict, resume_from: str) -> tuple[Dir, dict]:
    """Train, continuing (in this order) a previous attempt of this task, the checkpoint `resume_from`, or nothing."""
    name_wandb_run()
    checkpoint_dir = work_dir("checkpoint")
    resume_line = functools.partial(train.resume_command, config, checkpoint_dir, RESUME_COMMAND, PIPELINES_FILE)
    with said_at_exit_while_running(resume_line):
        summary = train.base_model(config, local_dir(data), checkpoint_dir, environment, resume_from,
                                   FlyteAttempts(), show_report)
    return upload(checkpoint_dir), summary


@gpu_env.task(retries=2, report=True, cache=EVALUATION_CACHE)
@one_line_user_errors
@retried_only_on_storage_errors
def evaluate_base_model(config: RunConfig, checkpoint: Dir, bundle_url: str, max_per_task: int) -> dict:
    """The CORE score of the trained base model, with its per-task table."""
    return evaluate.base_model(config, checkpoint.path, bundle_url, max_per_task, show_report)


async def prepare_data(config: RunConfig) -> tuple[Dir, dict]:
    """Tokenizer first, then one action per shard (download + tokenize), then one data directory."""
    tokenizer_dir = await prepare_tokenizer.aio(config.tokenizer, config.data_url, config.num_shards,
                                                config.bpe_vocab_size, config.bpe_train_chars)
    jobs = await plan_data_shards.aio(config, tokenizer_dir)
    parts = [part async for part in flyte.map.aio(functools.partial(prepare_data_shard, tokenizer_dir=tokenizer_dir),
                                                  jobs, concurrency=prepare.SHARD_CONCURRENCY,
                                                  return_exceptions=False)]
    return await collect_data.aio(config, parts, tokenizer_dir)


class TrainedBase(NamedTuple):
    """What pretraining's first half hands to its second."""

    config: RunConfig  # as setup.base_run resolved it
    environment: dict
    manifest: dict
    checkpoint: Dir
    training: dict
    core_gpu: dict  # where CORE runs (scale_up.py's overrides)


async def train_base(config: RunConfig, resume_from: str, train_task=train_base_model, gpu: dict | None = None,
                     world_size: int = 1, entry: str = "main", core_gpu: dict | None = None) -> TrainedBase:
    """Checks, the training node described and the data prepared (at once), training. In a driver task (`entry`,
    whose inputs a bad value is named by). `gpu` overrides where the environment report, training and CORE run (CORE
    on `core_gpu` where given), and `world_size` is the GPUs train_task runs on (scale_up.py)."""
    gpu = gpu or {}
    # here, before any task starts: a bad input costs no pod
    config = setup.base_run(config, resume_from, world_size, entry, remote=not is_local_run())
    environment, (data, manifest) = await concurrently(
        describe_training_node.override(**gpu).aio(),
        prepare_data(prepare.data_config(config)))  # keyed on the data's fields: a relaunch reuses it
    checkpoint, training = await train_task.override(**gpu).aio(config, data, environment, resume_from)
    return TrainedBase(config, environment, manifest, checkpoint, training, core_gpu or gpu)


async def score_and_report(trained: TrainedBase) -> RunOutputs:
    """CORE (when on), then the results JSON and the report card."""
    config, checkpoint = trained.config, trained.checkpoint
    core = {}
    if config.core_enabled:
        core = await evaluate_base_model.override(**trained.core_gpu).aio(config, checkpoint, config.eval_bundle_url,
                                                                          config.core_max_per_task)
    report_dir = work_dir("report")
    results = finish_base_run(config, trained.environment, trained.manifest, trained.training, checkpoint.path, core,
                              report_dir, local=is_local_run())
    return RunOutputs(results, checkpoint, upload(report_dir))


async def pretrain(config: RunConfig, resume_from: str, train_task=train_base_model, gpu: dict | None = None,
                   world_size: int = 1, entry: str = "main", core_gpu: dict | None = None) -> RunOutputs:
    """The stages, chained (train_base's arguments)."""
    return await score_and_report(await train_base(config, resume_from, train_task, gpu, world_size, entry, core_gpu))
