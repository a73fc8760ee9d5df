"""The data tasks: GPT-2's tokenizer or our BPE, one shard downloaded and tokenized, the shards collected into the
data directory training reads; the chat stages' conversations, RL's problems and the evaluation sets. Each writes
into the directory its front gives it, and takes as inputs exactly what decides its output: the fronts cache on them.
"""

from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data.chat_data import prepare_eval_data, prepare_rl_data, prepare_sft_data
from nanochat_flyte.data.prepare import build_tokenizer, merge_prepared
from nanochat_flyte.pipeline import Show
from nanochat_flyte.reporting.report import data_deck_html

# Bump when the token files' format or contents change: cached shards from older versions are then ignored.
DATA_VERSION = "2"  # 2: tokenizer directories carry their ranks and the chat tokens
# Bump when the prepared conversations or evaluation items change format.
CHAT_DATA_VERSION = "2"  # 2: GSM8K solutions keep their calculations, as tool calls
SHARD_CONCURRENCY = 8  # shard tasks at once: enough to saturate the hub, few enough not to be rate-limited
# What the pretraining data tasks read: the data's source and tokenizer, and the run's length (it sets the shards
# only_needed_shards prepares, and the epochs the manifest reports). Not the run's name, rates or W&B settings.
DATA_FIELDS = ("data_url", "num_shards", "val_shard", "only_needed_shards", "tokenizer", "bpe_vocab_size",
               "bpe_train_chars", "num_iterations", "total_batch_size", "eval_tokens")


def data_config(config: RunConfig) -> RunConfig:
    """The run's config with every field but DATA_FIELDS at its default: the data tasks' input, so that a relaunch
    (a new run name) or a run with other rates finds their outputs in the cache."""
    return RunConfig(**{field: getattr(config, field) for field in DATA_FIELDS})


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


def chat_sft_data(endpoint: str, smoltalk_epochs: float, mmlu_epochs: float, gsm8k_epochs: float,
                  max_conversations: int, val_conversations: int, seed: int, out_dir: Path) -> Path:
    """The SFT mixture (train.jsonl) and the held-out validation conversations (val.jsonl), from the hub."""
    prepare_sft_data(ChatConfig(hf_endpoint=endpoint, smoltalk_epochs=smoltalk_epochs, mmlu_epochs=mmlu_epochs,
                                gsm8k_epochs=gsm8k_epochs, max_conversations=max_conversations,
                                val_conversations=val_conversations, seed=seed), out_dir)
    return out_dir


def rl_problems(endpoint: str, max_problems: int, eval_problems: int, seed: int, out_dir: Path) -> Path:
    """RL's GSM8K problems: train.jsonl (to learn from) and val.jsonl (the validation pass@1), from the hub."""
    prepare_rl_data(RLConfig(hf_endpoint=endpoint, max_problems=max_problems, eval_problems=eval_problems, seed=seed),
                    out_dir)
    return out_dir


def chat_eval_data(endpoint: str, tasks: str, out_dir: Path) -> Path:
    """The evaluation sets (<task>.jsonl), so that the GPU task downloads nothing."""
    prepare_eval_data(ChatConfig(eval_tasks=tasks).eval_task_list, out_dir, endpoint)
    return out_dir
