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
    Deck,
    conditional,
    current_context,
    map_task,
    task,
    workflow,
)
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.download import DownloadError, check_data_url
from nanochat_flyte.data.prepare import ShardJob, build_tokenizer, merge_prepared, plan_jobs, prepare_shard
from nanochat_flyte.evaluation.bundle import BundleError, check_bundle_url, load_bundle
from nanochat_flyte.evaluation.core import core_log_metrics, core_table_html, score_core
from nanochat_flyte.model.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    TRAINING_STATE_FILE,
    check_save_to,
    fetch_checkpoint,
    load_model,
    read_checkpoint_json,
)
from nanochat_flyte.model.device import select_device, select_precision
from nanochat_flyte.pipeline.finish import finish_base_run
from nanochat_flyte.reporting.environment import environment_report, format_report
from nanochat_flyte.reporting.report import data_deck_html, environment_deck_html, training_deck_html
from nanochat_flyte.reporting.tracking import log_evaluation
from nanochat_flyte.training.pretrain import check_resume, train
from workflows.image import IMAGE
from workflows.support import (DATA_RESOURCES, HF_SECRET, TRAINING_RESOURCES, TRAINING_TASK, WANDB_SECRET,
                               TaskInputError, checkpoint_location, export_secret, is_local_run, one_line_user_errors,
                               restore_flyte_checkpoint, retried_on_storage_errors, save_flyte_checkpoint,
                               wandb_console_link)

# Bump when the token files' format or contents change: cached shards from older versions are then ignored.
DATA_CACHE_VERSION = "2"  # 2: tokenizer directories carry their ranks and the chat tokens
SHARD_CONCURRENCY = 8  # shard pods at once: enough to saturate the hub, few enough not to be rate-limited


# The same node kind as training (interruptible too: spot pools are tainted for interruptible pods), so that the
# report describes the GPU, driver and CPUs the training will get.
@task(container_image=IMAGE, secret_requests=[WANDB_SECRET, HF_SECRET], interruptible=True, enable_deck=True,
      **TRAINING_RESOURCES)
@one_line_user_errors
def setup_environment(config: RunConfig, resume_from: str) -> tuple[RunConfig, dict, bool]:
    """Validate the config (and the checkpoint to resume), probe the data and the CORE bundle, and report the machine,
    before any download or GPU time. Also says whether the final checkpoint gets a CORE score."""
    config = config.resolved().validate()
    if resume_from:
        check_resume(config, resume_from)
    check_save_to(config.save_to, "RunConfig")
    export_secret(HF_SECRET, "HF_TOKEN")
    check_data_url(config)
    if config.core_enabled:
        check_bundle_url(config.eval_bundle_url)
    export_secret(WANDB_SECRET, "WANDB_API_KEY")
    report = environment_report()
    print(format_report(report), flush=True)
    Deck("Environment", environment_deck_html(report))
    return config, report, config.core_enabled


@task(container_image=IMAGE, requests=DATA_RESOURCES, secret_requests=[HF_SECRET],
      cache=Cache(version=DATA_CACHE_VERSION))
@one_line_user_errors
def prepare_tokenizer(tokenizer: str, data_url: str, num_shards: int, bpe_vocab_size: int,
                      bpe_train_chars: int) -> FlyteDirectory:
    """GPT-2's identity, or our own BPE trained on the train shards. Cached: training a BPE takes a while."""
    export_secret(HF_SECRET, "HF_TOKEN")
    config = RunConfig(tokenizer=tokenizer, data_url=data_url, num_shards=num_shards,
                       bpe_vocab_size=bpe_vocab_size, bpe_train_chars=bpe_train_chars)
    out_dir = Path(current_context().working_directory) / "tokenizer"
    return FlyteDirectory(str(build_tokenizer(config, out_dir)))


@task(container_image=IMAGE, requests=DATA_RESOURCES, secret_requests=[HF_SECRET],
      cache=Cache(version=DATA_CACHE_VERSION))
@one_line_user_errors
def plan_data_shards(config: RunConfig, tokenizer_dir: FlyteDirectory) -> list[ShardJob]:
    export_secret(HF_SECRET, "HF_TOKEN")  # with only_needed_shards, shard 0 is downloaded here
    return plan_jobs(config, Path(tokenizer_dir.download()))


# Keyed by the job alone (data_url, shard index, split, tokenizer fingerprint): a relaunch or a scheduled run
# reuses every shard it has prepared before, whatever else changed in the config.
# No user retries: download_shard already retries with backoff, and a preempted spot pod is a system retry.
@task(container_image=IMAGE, requests=DATA_RESOURCES, secret_requests=[HF_SECRET], interruptible=True,
      cache=Cache(version=DATA_CACHE_VERSION, ignored_inputs=("tokenizer_dir",)))
@one_line_user_errors
def prepare_data_shard(job: ShardJob, tokenizer_dir: FlyteDirectory) -> FlyteDirectory:
    export_secret(HF_SECRET, "HF_TOKEN")
    out_dir = Path(current_context().working_directory) / f"{job.split}_{job.index:05d}"
    prepare_shard(job, Path(tokenizer_dir.download()), out_dir)
    return FlyteDirectory(str(out_dir))


@task(container_image=IMAGE, requests=DATA_RESOURCES, enable_deck=True, cache=Cache(version=DATA_CACHE_VERSION))
@one_line_user_errors
def collect_data(config: RunConfig, parts: list[FlyteDirectory], tokenizer_dir: FlyteDirectory
                 ) -> tuple[FlyteDirectory, dict]:
    out_dir = Path(current_context().working_directory) / "data"
    manifest = merge_prepared(config, [Path(part.download()) for part in parts], Path(tokenizer_dir.download()),
                              out_dir)
    Deck("Data", data_deck_html(manifest))
    return FlyteDirectory(str(out_dir)), manifest


@workflow
def download_and_prepare_data(config: RunConfig) -> tuple[FlyteDirectory, dict]:
    """Tokenizer first, then one pod per shard (download + tokenize), then one data directory."""
    tokenizer_dir = prepare_tokenizer(tokenizer=config.tokenizer, data_url=config.data_url,
                                      num_shards=config.num_shards, bpe_vocab_size=config.bpe_vocab_size,
                                      bpe_train_chars=config.bpe_train_chars)
    jobs = plan_data_shards(config=config, tokenizer_dir=tokenizer_dir)
    parts = map_task(functools.partial(prepare_data_shard, tokenizer_dir=tokenizer_dir),
                     concurrency=SHARD_CONCURRENCY)(job=jobs)
    return collect_data(config=config, parts=parts, tokenizer_dir=tokenizer_dir)


@task(**TRAINING_TASK)
@wandb_console_link
@one_line_user_errors
def train_base_model(config: RunConfig, data: FlyteDirectory, environment: dict, resume_from: str
                     ) -> tuple[FlyteDirectory, dict]:
    """Train, continuing (in this order) a previous attempt of this task, the checkpoint `resume_from`, or nothing."""
    export_secret(WANDB_SECRET, "WANDB_API_KEY")
    work_dir = Path(current_context().working_directory)
    checkpoint_dir = work_dir / "checkpoint"
    resume_dir = restore_flyte_checkpoint(checkpoint_dir)
    if resume_dir is None and resume_from:
        resume_dir = fetch_checkpoint(resume_from, work_dir / "resume_from")
        print(f"resuming from {resume_from}", flush=True)
    try:
        with retried_on_storage_errors():
            summary = train(config, Path(data.download()), checkpoint_dir, resume_dir=resume_dir,
                            on_save=save_flyte_checkpoint, env_report=environment)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C in a local run (flytekit raises SystemExit): say how to go on
        saved = Path(config.save_to) if config.save_to and "://" not in config.save_to else checkpoint_dir
        if (saved / CHECKPOINT_FILE).exists():
            print(f"resume with: pyflyte run workflows/nanochat.py main --config {saved / CONFIG_FILE} "
                  f"--resume_from {saved}", flush=True)
        raise
    Deck("Training", training_deck_html(checkpoint_dir, config, environment, summary))
    return FlyteDirectory(str(checkpoint_dir)), summary


# On the training node kind; cached on (checkpoint, bundle, max_per_task): scoring the same checkpoint again is free.
@task(container_image=IMAGE, secret_requests=[WANDB_SECRET], interruptible=True, retries=2, enable_deck=True,
      cache=Cache(version="1", ignored_inputs=("config",)), **TRAINING_RESOURCES)
@one_line_user_errors
def evaluate_base_model(config: RunConfig, checkpoint: FlyteDirectory, bundle_url: str, max_per_task: int) -> dict:
    """The CORE score of the trained base model (core_eval.py), with its per-task table."""
    export_secret(WANDB_SECRET, "WANDB_API_KEY")
    location = checkpoint_location(checkpoint)
    try:
        bundle = load_bundle(bundle_url)
    except (BundleError, DownloadError) as error:  # training is done and kept: say how to score it later
        raise TaskInputError(f"{error}. The trained checkpoint is kept at {location}; score it later with "
                        f"nanochat core-eval --checkpoint {location} --bundle BUNDLE") from error
    device = select_device(config.device)
    loaded = load_model(Path(checkpoint.download()), device)
    result = score_core(loaded.model, loaded.tokenizer, bundle, max_per_task=max_per_task or None,
                           batch_size=config.device_batch_size, precision=select_precision(device, config.dtype))
    step = read_checkpoint_json(location, TRAINING_STATE_FILE)["steps_completed"]
    result["wandb_url"] = log_evaluation(config, location, step, core_log_metrics(result),
                                         {"core_metric": result["core_metric"]})
    print(f"CORE: {result['core_metric']:.4f} ({len(result['tasks'])} tasks, {result['seconds']:.0f}s)", flush=True)
    Deck("CORE", core_table_html(result))
    return result


@task(container_image=IMAGE)
def no_core() -> dict:
    """The CORE branch when evaluate_core is off or no eval_bundle_url is set."""
    return {}


@task(container_image=IMAGE)
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
             checked_first=None) -> RunOutputs:
    """The stages, chained. `gpu_node` overrides where setup, training and CORE run (workflows/scale_up.py).
    `checked_first`: an output of a task that must succeed before anything starts (a pipeline's later configs)."""
    gpu_node = gpu_node or {}
    resolved, environment, core_on = setup_environment(config=config, resume_from=resume_from
                                                       ).with_overrides(**gpu_node)
    if checked_first is not None:
        checked_first >> resolved
    data, manifest = download_and_prepare_data(config=resolved)
    checkpoint, training = train_task(config=resolved, data=data, environment=environment,
                                      resume_from=resume_from).with_overrides(**gpu_node)
    core = (conditional("core").if_(core_on.is_true())
            .then(evaluate_base_model(config=resolved, checkpoint=checkpoint, bundle_url=resolved.eval_bundle_url,
                                      max_per_task=resolved.core_max_per_task).with_overrides(**gpu_node))
            .else_().then(no_core()))
    results, report = aggregate_results(config=resolved, environment=environment, manifest=manifest,
                                        training=training, checkpoint=checkpoint, core=core)
    return RunOutputs(results, checkpoint, report)


@workflow
def main(config: RunConfig = RunConfig(), resume_from: str = "") -> RunOutputs:
    """The whole run. Returns the results JSON, the checkpoint directory and the report card.

    resume_from: a checkpoint directory or URI (a previous run's `checkpoint` output, or its save_to copy) to
    continue: a run that stopped early goes on from its last save; a finished one is extended to a larger
    num_iterations (the LR schedule is then that of the new num_iterations)."""
    return pretrain(config, resume_from)
