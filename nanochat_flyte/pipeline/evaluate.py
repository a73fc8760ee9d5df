"""The evaluation tasks: CORE of a base checkpoint, the chat evaluation of an SFT or RL checkpoint. Each reads the
checkpoint where it lives (a directory or URI: only what inference needs is fetched), adds its numbers to the W&B run
that trained it, and shows its table on a card.
"""

from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig, task_list
from nanochat_flyte.data.download import DownloadError
from nanochat_flyte.errors import ConfigError, UserError
from nanochat_flyte.evaluation.bundle import BundleError, load_bundle
from nanochat_flyte.evaluation.chat_eval import chat_metrics, chat_table_html, evaluate_chat, read_eval_items
from nanochat_flyte.evaluation.core import check_max_per_task, core_log_metrics, core_table_html, score_core
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.model.checkpoint import TRAINING_STATE_FILE, checkpoint_run_config, load_model, read_checkpoint_json
from nanochat_flyte.model.device import select_device, select_precision
from nanochat_flyte.pipeline import Show
from nanochat_flyte.reporting.tracking import log_evaluation

# Bump when a checkpoint's scores would change (a new task, a fixed metric): cached evaluations are then ignored.
# 2: CORE's items and few-shot examples drawn as nanochat draws them; 3: the chat evaluation's subsets no longer
# follow the training seed, GSM8K keeps a period after the answer as nanochat does, ChatCORE needs every task
EVALUATION_VERSION = "3"


def base_model(config: RunConfig, checkpoint: str, bundle_url: str, max_per_task: int, show: Show) -> dict:
    """The CORE score of the trained base model (evaluation/core.py), with its per-task table."""
    try:
        bundle = load_bundle(bundle_url)
        check_max_per_task(bundle, max_per_task)  # again: a URL's bundle may have changed since the checks
    except (BundleError, DownloadError, ConfigError) as error:  # training is done and kept: say how to score it later
        raise UserError(f"{error}. The trained checkpoint is kept at {checkpoint}; score it later with "
                        f"nanochat core-eval --checkpoint {checkpoint} --bundle BUNDLE") from error
    device = select_device(config.device)
    loaded = load_model(checkpoint, device)
    result = score_core(loaded.model, loaded.tokenizer, bundle, max_per_task=max_per_task or None,
                        batch_size=config.device_batch_size, precision=select_precision(device, config.dtype))
    step = read_checkpoint_json(checkpoint, TRAINING_STATE_FILE)["steps_completed"]
    result["wandb_url"] = log_evaluation(config, checkpoint, step, core_log_metrics(result),
                                         {"core_metric": result["core_metric"]})
    print(f"CORE: {result['core_metric']:.4f} ({len(result['tasks'])} tasks, {result['seconds']:.0f}s)", flush=True)
    show("CORE", core_table_html(result))
    return result


def chat_settings(config: ChatConfig | RLConfig) -> dict:
    """The settings of a stage's config that change its chat evaluation's scores: chat_model's arguments beside the
    checkpoint and the data, and so the cache key of the fronts' evaluation tasks."""
    return dict(tasks=config.eval_tasks, max_per_task=config.eval_max_per_task, max_tokens=config.eval_max_tokens,
                humaneval=config.humaneval)


def chat_model(config: ChatConfig, checkpoint: str, eval_data: Path, tasks: str, max_per_task: int, max_tokens: int,
               humaneval: str, show: Show) -> dict:
    """ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval (in the sandbox, where it works), and ChatCORE. Every
    setting that changes the scores is an argument of its own (chat_settings); `config` brings the rest."""
    engine = Engine.from_checkpoint(checkpoint, device=config.device)
    items = read_eval_items(eval_data, task_list(tasks))
    result = evaluate_chat(engine, items, max_per_task=max_per_task, batch_size=config.eval_batch_size,
                           max_tokens=max_tokens, humaneval=humaneval)
    state = read_checkpoint_json(checkpoint, TRAINING_STATE_FILE)
    run_config = checkpoint_run_config(checkpoint)
    # into the W&B run of the training that made the checkpoint (SFT's or RL's)
    result["wandb_url"] = log_evaluation(run_config, checkpoint, state["steps_completed"], chat_metrics(result),
                                         {"chatcore": result["chatcore"]}, phase=state.get("stage", engine.phase))
    show("Chat evaluation", chat_table_html(result))
    return result
