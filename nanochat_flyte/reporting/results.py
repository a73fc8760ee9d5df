"""The final results of a run: one JSON document, shaped like the reference run's."""

import json
from pathlib import Path

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.dataloader import epochs
from nanochat_flyte.files import filesystem

WORKFLOW_NAME = "nanochat_full_training"


def aggregate_results(config: RunConfig, environment: dict, manifest: dict, training: dict,
                      checkpoint_dir: str, core: dict | None = None) -> dict:
    """Combine what the stages reported. `training` is the summary train() returns; `core` the CORE evaluation
    (evaluation.core.score_core; empty or None when it did not run)."""
    data = {key: manifest.get(key) for key in ("train_tokens", "val_tokens")}
    data["tokens_needed"] = config.tokens_needed  # (the data directory serves runs of any length)
    data["epochs"] = epochs(config, data["train_tokens"]) if data["train_tokens"] else None
    data["tokenizer"] = manifest.get("tokenizer", {}).get("name")
    data["train_shards"] = [entry["shard"] for entry in manifest.get("train", [])]
    data["val_shards"] = [entry["shard"] for entry in manifest.get("val", [])]
    return {
        "workflow": WORKFLOW_NAME,
        "run_name": config.run_name,
        "training": {**training, "checkpoint_dir": checkpoint_dir},
        "data": data,
        "environment": environment,
        "config": config.to_dict(),
        "wandb_url": training.get("wandb_url"),
        "core": core or None,
    }


# by the checkpoint's stage: the workflow that runs the stage on its own, the key of its training summary, the key of
# the checkpoint it started from
CHAT_STAGES = {"chat": ("chat_sft", "sft", "base_checkpoint"), "rl": ("chat_rl", "rl", "sft_checkpoint")}


def chat_results(config: dict, start_checkpoint: str, training: dict, evaluation: dict, checkpoint_dir: str) -> dict:
    """The results of a chat stage: SFT (from a base checkpoint) or RL (from an SFT one), as its training summary
    (Trainer) and the chat evaluation of its checkpoint (chat_eval.evaluate_chat)."""
    workflow, summary_key, start_key = CHAT_STAGES[training.get("stage", "chat")]
    return {
        "workflow": workflow,
        "run_name": training.get("run_name"),
        start_key: start_checkpoint,
        summary_key: {**training, "checkpoint_dir": checkpoint_dir},
        "chat_eval": evaluation,
        "chatcore": evaluation.get("chatcore"),
        "config": config,
        "wandb_url": training.get("wandb_url"),
    }


RESULTS_FILE = "results.json"


def write_results(results: dict, directory: str | Path) -> None:
    """results.json in a directory or under any fsspec URI (s3://...)."""
    target = f"{str(directory).rstrip('/')}/{RESULTS_FILE}"
    store, path = filesystem(target)
    store.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with store.open(path, "w") as file:
        file.write(json.dumps(results, indent=2, default=str) + "\n")
