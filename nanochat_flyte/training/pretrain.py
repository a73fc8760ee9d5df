"""Pretraining: next-token prediction on the prepared FineWeb-Edu tokens, validated in bits per byte, with CORE now and
then, and the samples nanochat prints; `train()` runs it in the shared training loop (loop.py).
"""

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.dataloader import (
    TokenLoader,
    data_manifest,
    shard_files,
    validation_tokens,
    warn_if_repeated,
)
from nanochat_flyte.data.tokenizer import load_tokenizer, token_byte_lengths
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.evaluation.bpb import evaluate_bpb
from nanochat_flyte.evaluation.bundle import load_bundle
from nanochat_flyte.evaluation.core import check_max_per_task, core_log_metrics, score_core
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.model.checkpoint import TOKENIZER_DIR, same_location
from nanochat_flyte.training.loop import Phase, Trainer

SAMPLE_PROMPTS = (
    "The capital of France is",
    "If yesterday was Friday, then tomorrow will be",
    "The chemical symbol of gold is",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def check_data_fits(config: RunConfig, manifest: dict, data_dir: Path) -> None:
    """The prepared data is what the config asks for: its source (the checkpoint's config.json must name the data
    it trained on, which a resume is checked against), its tokenizer (data prepared for another run would train
    silently on other token ids) and enough validation tokens for eval_tokens."""
    for field, prepared in manifest.get("source", {}).items():  # (older data directories record none)
        configured = getattr(config, field)
        # a folder or URL written another way (a trailing slash, file://, ../) is the same source
        if not (same_location(configured, prepared) if field == "data_url" else configured == prepared):
            raise ConfigError(field, f"{getattr(config, field)!r}, but the data in {data_dir} was prepared with "
                                     f"{field}={prepared}: give {field}={prepared}, or prepare data for this config")
    tokenizer = manifest["tokenizer"]
    kind = "gpt2" if tokenizer["name"] == "gpt2" else "bpe"
    if kind != config.tokenizer or (kind == "bpe" and tokenizer["vocab_size"] != config.bpe_vocab_size):
        raise ConfigError("tokenizer", f"{config.tokenizer}"
                                       f"{f' of {config.bpe_vocab_size:,} tokens' if config.tokenizer == 'bpe' else ''}"
                                       f", but the data in {data_dir} was tokenized by {kind} of "
                                       f"{tokenizer['vocab_size']:,} tokens: prepare it for this config")
    if manifest["val_tokens"] < config.eval_tokens:
        raise ConfigError("eval_tokens", f"{config.eval_tokens:,} is more than the {manifest['val_tokens']:,} "
                                         f"validation tokens in {data_dir}")


class Pretraining(Phase):
    """Next-token prediction on the data directory's train shards; validation bits per byte on its val shard."""

    model_kind, stage, metric = "base", "base", "bpb"

    def __init__(self, config: RunConfig, data_dir: Path):
        self.config, self.data_dir = config, Path(data_dir)
        if not self.data_dir.is_dir():
            raise ConfigError("data_dir", f"no such folder {str(self.data_dir)!r} (a prepared data directory: "
                                          "nanochat prepare)", "train")
        manifest = data_manifest(self.data_dir)
        check_data_fits(config, manifest, self.data_dir)
        warn_if_repeated(config, manifest["train_tokens"])
        self.tokenizer_dir = self.data_dir / TOKENIZER_DIR
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.val_tokens = validation_tokens(self.data_dir, config.eval_tokens)
        self.token_bytes = token_byte_lengths(self.tokenizer)
        self.core_bundle = None  # loaded by attach(), where CORE runs during training

    def batches(self, batch_size, device, rank, world_size, state):
        loader = TokenLoader(shard_files(self.data_dir, "train"), batch_size, self.config.max_seq_len,
                             seed=self.config.seed, device=device, rank=rank, world_size=world_size)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def evaluate(self, model, batch_size, device, precision):
        return evaluate_bpb(model, self.val_tokens, self.token_bytes, batch_size=batch_size,
                            seq_len=self.config.max_seq_len, eval_tokens=self.config.eval_tokens, device=device,
                            precision=precision)

    def attach(self, model, precision):
        """With CORE during training, its bundle is loaded (and checked whole) now, before the first step: a bad one
        would otherwise end the run at step core_metric_every."""
        if self.config.core_enabled and 0 < self.config.core_metric_every < self.config.num_iterations:
            if dist.is_initialized() and dist.get_rank() > 0:  # rank 0 downloads it; the others find it cached
                dist.barrier()
            self.core_bundle = load_bundle(self.config.eval_bundle_url)
            check_max_per_task(self.core_bundle, self.config.core_max_per_task)
            if dist.is_initialized() and dist.get_rank() == 0:
                dist.barrier()

    def periodic_metrics(self, model, step, batch_size, precision):
        """CORE every core_metric_every steps (not at the end: evaluate_base_model scores the final checkpoint)."""
        config = self.config
        every = config.core_metric_every if config.core_enabled else 0
        if not every or step == 0 or step % every or step == config.num_iterations:
            return {}
        result = score_core(model, self.tokenizer, self.core_bundle, max_per_task=config.core_max_per_task or None,
                               batch_size=batch_size, precision=precision)
        return core_log_metrics(result)

    def samples(self, model, precision):
        config = self.config
        engine = Engine(model, self.tokenizer, precision)
        params = SamplingParams(max_tokens=config.sample_max_tokens, temperature=config.sample_temperature,
                                top_k=config.sample_top_k or None, seed=config.seed)
        # A prompt longer than a short context leaves room for the sample: its start is cropped (nanoGPT's way)
        room = max(1, engine.context - config.sample_max_tokens)
        prompts = [engine.completion_prompt(prompt)[-room:] for prompt in SAMPLE_PROMPTS]
        return [{"prompt": prompt, "completion": completion.text}
                for prompt, completion in zip(SAMPLE_PROMPTS, engine.generate_batch(prompts, params))]


def train(config: RunConfig, data_dir: Path, out_dir: Path, *, resume_dir: Path | None = None,
          on_save: Callable[[Path], None] | None = None, env_report: dict | None = None) -> dict:
    """Pretrain a base model on data_dir's tokens; write the checkpoint directory to out_dir; return the summary."""
    return Trainer(config, Pretraining(config, data_dir), out_dir, resume_dir=resume_dir, on_save=on_save,
                   env_report=env_report).run()
