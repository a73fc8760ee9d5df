"""The data tasks: GPT-2's tokenizer or our BPE, one shard downloaded and tokenized, the shards collected into the
data directory training reads; the chat stages' conversations, RL's problems and the evaluation sets. Each writes
into the directory its front gives it, and takes as inputs exactly what decides its output: the fronts cache on them.
"""

from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig, task_list
from nanochat_flyte.data.chat_data import prepare_eval_data, prepare_rl_data, prepare_sft_data
from nanochat_flyte.data.prepare import build_tokenizer, merge_prepared
from nanochat_flyte.pipeline import Show
from nanochat_flyte.reporting.report import data_deck_html

# Bump when the token files' format or contents change: cached shards from older versions are then ignored.
DATA_VERSION = "2"  # 2: tokenizer directories carry their ranks and the chat tokens
# Bump when the prepared conversations or evaluation items change format.
CHAT_DATA_VERSION = "2"  # 2: GSM8K solutions keep their calculations, as tool calls
SFT_DATA_FIELDS = ("smoltalk_epochs", "mmlu_epochs", "gsm8k_epochs", "max_conversations", "val_conversations", "seed")
RL_DATA_FIELDS = ("max_problems", "eval_problems", "seed")
SHARD_CONCURRENCY = 8  # shard tasks at once: enough to saturate the hub, few enough not to be rate-limited
# What the pretraining data tasks read: the data's source and tokenizer. Not the run's name, rates or W&B settings,
# nor its length, but with only_needed_shards, which prepares the shards of num_iterations x total_batch_size tokens.
DATA_FIELDS = ("data_url", "num_shards", "val_shard", "only_needed_shards", "tokenizer", "bpe_vocab_size",
               "bpe_train_chars", "eval_tokens")
RUN_LENGTH_FIELDS = ("num_iterations", "total_batch_size")


def data_config(config: RunConfig) -> RunConfig:
    """The run's config with every field but DATA_FIELDS (and, with only_needed_shards, RUN_LENGTH_FIELDS) at its
    default: the data tasks' input, so that a relaunch (a new run name, other rates, a longer run) finds their
    outputs in the cache."""
    fields = DATA_FIELDS + (RUN_LENGTH_FIELDS if config.only_needed_shards else ())
    return RunConfig(**{field: getattr(config, field) for field in fields})


def tokenizer(tokenizer: str, data_url: str, num_shards: int, bpe_vocab_size: int, bpe_train_chars: int,
              out_dir: Path) -> Path:
    """GPT-2's identity, or our own BPE trained on the train shards, in out_dir."""
    config = RunConfig(tokenizer=tokenizer, data_url=data_url, num_shards=num_shards, bpe_vocab_size=bpe_vocab_size,
                       bpe_train_chars=bpe_train_chars)
    return build_tokenizer(config, out_dir)


def collect_data(config: RunConfig, parts: list[Path], tokenizer_dir: Path, out_dir: Path, show: Show) -> dict:
    """The prepared shards merged into one data directory (out_dir); its manifest, also on the Data card."""
    manifest = merge_prepared(config, parts, tokenizer_dir, out_dir)
    show("Data", data_deck_html(manifest))
    return manifest


def sft_data_settings(config: ChatConfig) -> dict:
    """What decides the SFT data besides the hub endpoint: the data task's inputs (and so its cache key), and what
    a resumed run must keep."""
    return {field: getattr(config, field) for field in SFT_DATA_FIELDS}


def rl_data_settings(config: RLConfig) -> dict:
    """What decides RL's problems besides the hub endpoint."""
    return {field: getattr(config, field) for field in RL_DATA_FIELDS}


def chat_sft_data(endpoint: str, out_dir: Path, **settings) -> Path:
    """The SFT mixture (train.jsonl) and the held-out validation conversations (val.jsonl), from the hub; settings:
    sft_data_settings."""
    prepare_sft_data(ChatConfig(hf_endpoint=endpoint, **settings), out_dir)
    return out_dir


def rl_problems(endpoint: str, out_dir: Path, **settings) -> Path:
    """RL's GSM8K problems: train.jsonl (to learn from) and val.jsonl (the validation pass@1), from the hub;
    settings: rl_data_settings."""
    prepare_rl_data(RLConfig(hf_endpoint=endpoint, **settings), out_dir)
    return out_dir


def chat_eval_data(endpoint: str, tasks: str, out_dir: Path) -> Path:
    """The evaluation sets (<task>.jsonl), so that the GPU task downloads nothing."""
    prepare_eval_data(task_list(tasks), out_dir, endpoint)
    return out_dir
