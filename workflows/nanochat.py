"""nanochat pretraining as a Flyte workflow: FineWeb-Edu shards -> tokens -> trained GPT -> results.

    pyflyte run workflows/nanochat.py main --config configs/smoke.yaml             # locally, on a laptop
    pyflyte run --remote workflows/nanochat.py main --config configs/d8_t4.yaml    # on a cluster

This file only declares tasks, resources, images and caching; the work lives in `nanochat_flyte`.
"""

import functools
from pathlib import Path
from typing import NamedTuple

from flytekit import (
    Cache,
    conditional,
    current_context,
    map_task,
    task,
    workflow,
)
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.prepare import ShardJob, plan_jobs, prepare_shard
from nanochat_flyte.pipeline import evaluate, prepare, secrets, setup, train
from nanochat_flyte.pipeline.finish import finish_base_run
from workflows.image import IMAGE
from workflows.support import (
    DATA_RESOURCES,
    DRIVER_RESOURCES,
    HF_SECRET,
    TRAINING_RESOURCES,
    TRAINING_TASK,
    WANDB_SECRET,
    FlytekitAttempts,
    checkpoint_location,
    deck,
    export_secret,
    is_local_run,
    one_line_user_errors,
    retried_on_storage_errors,
    wandb_console_link,
    with_secrets,
)

DATA_CACHE_VERSION = prepare.DATA_VERSION  # cached data from an older version of the format is ignored


# On a CPU pod: a bad input fails in one line before any GPU node is asked for, or any download starts.
@task(container_image=IMAGE, **with_secrets(HF_SECRET), **DRIVER_RESOURCES)
@one_line_user_errors
def check_run_config(config: RunConfig, resume_from: str, world_size: int, entry: str
                     ) -> tuple[RunConfig, bool, RunConfig]:
    """Validate the config for world_size GPUs (and the checkpoint to resume, the input of the workflow `entry`), and
    probe the data and the CORE bundle. Returns the config the run uses, whether the final checkpoint gets a CORE
    score, and the data tasks' config (their cache key: prepare.data_config)."""
    export_secret(secrets.HF)
    config = setup.base_run(config, resume_from, world_size, entry, remote=not is_local_run())
    return config, config.core_enabled, prepare.data_config(config)


# The same node kind as training (interruptible too: spot pools are tainted for interruptible pods), so that the
# report describes the GPU, driver and CPUs the training will get, and a chat stage's sandbox is checked where its
# evaluation will run (sandbox_for: setup.sandbox_required_by), before training.
@task(container_image=IMAGE, **with_secrets(WANDB_SECRET), interruptible=True, enable_deck=True,
      **TRAINING_RESOURCES)
@one_line_user_errors
def describe_training_node(sandbox_for: str = "", later_stage: bool = False) -> dict:
    """The environment report of the training node kind. A later stage's local run leaves it out of the log: the
    terminal has it from pretraining."""
    export_secret(secrets.WANDB)  # the report says whether W&B can log in
    return setup.describe_machine(deck, printed=not (later_stage and is_local_run()), sandbox_for=sandbox_for)


@task(container_image=IMAGE, **with_secrets(HF_SECRET), cache=Cache(version=DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def prepare_tokenizer(tokenizer: str, data_url: str, num_shards: int, bpe_vocab_size: int,
                      bpe_train_chars: int) -> FlyteDirectory:
    """GPT-2's identity, or our own BPE trained on the train shards. Cached: training a BPE takes a while."""
    export_secret(secrets.HF)
    out_dir = Path(current_context().working_directory) / "tokenizer"
    return FlyteDirectory(str(prepare.tokenizer(tokenizer, data_url, num_shards, bpe_vocab_size, bpe_train_chars,
                                                out_dir)))


@task(container_image=IMAGE, **with_secrets(HF_SECRET), cache=Cache(version=DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def plan_data_shards(config: RunConfig, tokenizer_dir: FlyteDirectory) -> list[ShardJob]:
    export_secret(secrets.HF)  # with only_needed_shards, shard 0 is downloaded here
    return plan_jobs(config, Path(tokenizer_dir.download()))


# Keyed by the job alone (data_url, shard index, split, tokenizer fingerprint): a relaunch or a scheduled run
# reuses every shard it has prepared before, whatever else changed in the config.
# No user retries: download_shard already retries with backoff, and a preempted spot pod is a system retry.
@task(container_image=IMAGE, **with_secrets(HF_SECRET), interruptible=True,
      cache=Cache(version=DATA_CACHE_VERSION, ignored_inputs=("tokenizer_dir",)), **DATA_RESOURCES)
@one_line_user_errors
def prepare_data_shard(job: ShardJob, tokenizer_dir: FlyteDirectory) -> FlyteDirectory:
    export_secret(secrets.HF)
    out_dir = Path(current_context().working_directory) / job.name
    prepare_shard(job, Path(tokenizer_dir.download()), out_dir)
    return FlyteDirectory(str(out_dir))


@task(container_image=IMAGE, **with_secrets(), enable_deck=True, cache=Cache(version=DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def collect_data(config: RunConfig, parts: list[FlyteDirectory], tokenizer_dir: FlyteDirectory
                 ) -> tuple[FlyteDirectory, dict]:
    out_dir = Path(current_context().working_directory) / "data"
    manifest = prepare.collect_data(config, [Path(part.download()) for part in parts],
                                    Path(tokenizer_dir.download()), out_dir, deck)
    return FlyteDirectory(str(out_dir)), manifest


@workflow
def download_and_prepare_data(config: RunConfig) -> tuple[FlyteDirectory, dict]:
    """Tokenizer first, then one pod per shard (download + tokenize), then one data directory."""
    tokenizer_dir = prepare_tokenizer(tokenizer=config.tokenizer, data_url=config.data_url,
                                      num_shards=config.num_shards, bpe_vocab_size=config.bpe_vocab_size,
                                      bpe_train_chars=config.bpe_train_chars)
    jobs = plan_data_shards(config=config, tokenizer_dir=tokenizer_dir)
    parts = map_task(functools.partial(prepare_data_shard, tokenizer_dir=tokenizer_dir),
                     concurrency=prepare.SHARD_CONCURRENCY)(job=jobs)
    return collect_data(config=config, parts=parts, tokenizer_dir=tokenizer_dir)


@task(**TRAINING_TASK)
@wandb_console_link
@one_line_user_errors
def train_base_model(config: RunConfig, data: FlyteDirectory, environment: dict, resume_from: str
                     ) -> tuple[FlyteDirectory, dict]:
    """Train, continuing (in this order) a previous attempt of this task, the checkpoint `resume_from`, or nothing."""
    export_secret(secrets.WANDB)
    export_secret(secrets.HF)  # CORE during training (core_metric_every) reads its bundle
    checkpoint_dir = Path(current_context().working_directory) / "checkpoint"
    try:
        with retried_on_storage_errors():
            summary = train.base_model(config, Path(data.download()), checkpoint_dir, environment, resume_from,
                                       FlytekitAttempts(), deck)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C in a local run (flytekit raises SystemExit): say how to go on
        if line := train.resume_command(config, checkpoint_dir, "pyflyte run workflows/nanochat.py main",
                                        "workflows/chat.py"):
            print(line, flush=True)
        raise
    return FlyteDirectory(str(checkpoint_dir)), summary


# On the training node kind; cached on (checkpoint, bundle, max_per_task): scoring the same checkpoint again is free.
# With the HF token: a bundle on a gated mirror is fetched with it, as the setup probed it.
@task(container_image=IMAGE, **with_secrets(WANDB_SECRET, HF_SECRET), interruptible=True, retries=2,
      enable_deck=True, cache=Cache(version=evaluate.EVALUATION_VERSION, ignored_inputs=("config",)),
      **TRAINING_RESOURCES)
@one_line_user_errors
def evaluate_base_model(config: RunConfig, checkpoint: FlyteDirectory, bundle_url: str, max_per_task: int) -> dict:
    """The CORE score of the trained base model (evaluation/core.py), with its per-task table."""
    export_secret(secrets.WANDB)
    export_secret(secrets.HF)
    with retried_on_storage_errors():
        return evaluate.base_model(config, checkpoint_location(checkpoint), bundle_url, max_per_task, deck)


@task(container_image=IMAGE, **with_secrets(), **DRIVER_RESOURCES)
def no_core() -> dict:
    """The CORE branch when evaluate_core is off or no eval_bundle_url is set."""
    return {}


@task(container_image=IMAGE, **with_secrets(), **DRIVER_RESOURCES)
@one_line_user_errors
def aggregate_results(config: RunConfig, environment: dict, manifest: dict, training: dict,
                      checkpoint: FlyteDirectory, core: dict) -> tuple[dict, FlyteDirectory]:
    """The results JSON, and the run's report card with every evaluation (report.md, plots, results.json)."""
    report_dir = Path(current_context().working_directory) / "report"
    results = finish_base_run(config, environment, manifest, training, checkpoint_location(checkpoint), core,
                              report_dir, local=is_local_run())
    return results, FlyteDirectory(str(report_dir))


class RunOutputs(NamedTuple):
    results: dict  # the results JSON
    checkpoint: FlyteDirectory  # checkpoint.pt, model_config.json, training_state.json, tokenizer/, metrics, ...
    report: FlyteDirectory  # report.md with its plots and the CORE table, and results.json


def pretrain(config: RunConfig, resume_from: str, train_task=train_base_model, gpu_node: dict | None = None,
             checked_first=None, world_size: int = 1, entry: str = "main", core_node: dict | None = None
             ) -> RunOutputs:
    """The stages, chained. `gpu_node` overrides where the environment report, training and CORE run (CORE on
    `core_node` where given), and `world_size` is the GPUs train_task runs on (workflows/scale_up.py).
    `checked_first`: an output of a task that must succeed before anything starts (a pipeline's later configs).
    `entry`: the workflow, whose inputs a bad value is named by."""
    gpu_node = gpu_node or {}
    core_node = core_node or gpu_node
    resolved, core_on, data_config = check_run_config(config=config, resume_from=resume_from, world_size=world_size,
                                                      entry=entry)
    if checked_first is not None:
        checked_first >> resolved
    environment = describe_training_node().with_overrides(**gpu_node)
    resolved >> environment  # no GPU node is asked for before the inputs are checked
    data, manifest = download_and_prepare_data(config=data_config)
    checkpoint, training = train_task(config=resolved, data=data, environment=environment,
                                      resume_from=resume_from).with_overrides(**gpu_node)
    core = (conditional("core").if_(core_on.is_true())
            .then(evaluate_base_model(config=resolved, checkpoint=checkpoint, bundle_url=resolved.eval_bundle_url,
                                      max_per_task=resolved.core_max_per_task).with_overrides(**core_node))
            .else_().then(no_core()))
    results, report = aggregate_results(config=resolved, environment=environment, manifest=manifest,
                                        training=training, checkpoint=checkpoint, core=core)
    return RunOutputs(results, checkpoint, report)


@workflow
def main(config: RunConfig = RunConfig(), resume_from: str = "") -> RunOutputs:
    """The whole run: data, pretraining, CORE, the results JSON, the checkpoint and the report card.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        resume_from: a checkpoint directory or URI to continue (a run's `checkpoint` output or its save_to copy): a
            run that stopped goes on from its last save, a finished one is extended to a larger num_iterations
            (with that length's LR schedule). Empty: a new run.
    """
    return pretrain(config, resume_from)
