"""RunConfig: the one input of the `main` workflow, and of every library entry point.

Defaults reproduce the reference run: a depth-8 nanochat GPT on one T4, context 512, device batch 16,
total batch 65,536 tokens, 1000 iterations on 50 FineWeb-Edu shards with the GPT-2 tokenizer.
Presets in `configs/*.yaml` set only the fields they change; the rest keep these defaults.
"""

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

HF_FINEWEB_EDU_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
LAST_FINEWEB_EDU_SHARD = 1822  # shards are numbered 0..1822; the last one is held out for validation
TOKENIZERS = ("gpt2", "bpe")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu", "mps")


class ConfigError(ValueError):
    """A RunConfig field holds a value the run cannot use. The message names the field."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"RunConfig.{field}: {problem}")


@dataclass
class RunConfig:
    # --- identity ---
    run_name: str = ""  # empty: nanochat_d{depth}_flyte_{YYYYMMDD_HHMMSS}
    seed: int = 42

    # --- data ---
    data_url: str = HF_FINEWEB_EDU_URL  # https/http, local path, file://, or any fsspec URL (s3://, gs://)
    num_shards: int = 50  # train shards 0..num_shards-1
    val_shard: int = LAST_FINEWEB_EDU_SHARD
    only_needed_shards: bool = False  # prepare only as many train shards as num_iterations consumes
    tokenizer: str = "gpt2"  # "gpt2" (tiktoken) or "bpe" (train our own, nanochat-style)
    bpe_vocab_size: int = 65536  # fits uint16 token files; includes the 9 special tokens (<|endoftext|>, chat)
    bpe_train_chars: int = 2_000_000_000  # characters of train text the BPE tokenizer learns from
    download_workers: int = 8  # parallel shard downloads inside one task

    # --- model ---
    depth: int = 8  # model_dim = depth * 64, head_dim 128: depth 8 -> dim 512, 4 heads

    # --- batch ---
    max_seq_len: int = 512
    device_batch_size: int = 16
    total_batch_size: int = 65536  # tokens per optimizer step, across accumulation and ranks

    # --- optimisation (nanochat's original recipe) ---
    num_iterations: int = 1000
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0

    # --- evaluation, samples, checkpoints ---
    eval_every: int = 100
    eval_tokens: int = 524_288  # a fixed slice of the validation tokens, so bpb is comparable across runs
    sample_every: int = 500
    sample_max_tokens: int = 32
    sample_temperature: float = 0.0  # 0 = greedy
    sample_top_k: int = 50
    save_every: int = 100  # ~2 minutes of T4 time between saves: a preemption loses little

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on compute capability >= 8.0, float16 + GradScaler below, float32 on CPU
    compile: bool = True  # torch.compile on CUDA

    # --- tracking ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"  # auto: online when a W&B key is present, offline otherwise

    # ------------------------------------------------------------------ derived values

    def resolved(self, now: datetime | None = None) -> "RunConfig":
        """A copy with the run name filled in. Call once, at the start of a run."""
        if self.run_name:
            return dataclasses.replace(self)
        stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
        return dataclasses.replace(self, run_name=f"nanochat_d{self.depth}_flyte_{stamp}")

    def tokens_per_micro_batch(self, world_size: int = 1) -> int:
        return self.device_batch_size * self.max_seq_len * world_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        per_micro = self.tokens_per_micro_batch(world_size)
        if self.total_batch_size % per_micro:
            raise ConfigError(
                "total_batch_size",
                f"{self.total_batch_size} is not divisible by device_batch_size x max_seq_len x world_size "
                f"= {self.device_batch_size} x {self.max_seq_len} x {world_size} = {per_micro}",
            )
        return self.total_batch_size // per_micro

    @property
    def tokens_needed(self) -> int:
        return self.num_iterations * self.total_batch_size

    # ------------------------------------------------------------------ validation

    def validate(self, world_size: int = 1) -> "RunConfig":
        """Raise ConfigError naming the first bad field. Cheap, offline: run it before any download."""

        def at_least(field: str, minimum: int) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(field, f"must be an integer, got {value!r}")
            if value < minimum:
                raise ConfigError(field, f"must be >= {minimum}, got {value}")

        def one_of(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ConfigError(field, f"unknown value {value!r}; choose one of {', '.join(allowed)}")

        for field in ("depth", "num_shards", "max_seq_len", "device_batch_size", "total_batch_size",
                      "num_iterations", "eval_every", "eval_tokens", "sample_every", "save_every",
                      "download_workers", "sample_max_tokens"):
            at_least(field, 1)
        for field in ("val_shard", "seed", "sample_top_k", "bpe_train_chars"):
            at_least(field, 0)
        one_of("tokenizer", TOKENIZERS)
        one_of("wandb_mode", WANDB_MODES)
        one_of("dtype", DTYPES)
        one_of("device", DEVICES)
        if not self.data_url.strip():
            raise ConfigError("data_url", "must not be empty")
        if self.val_shard < self.num_shards:
            raise ConfigError(
                "val_shard",
                f"shard {self.val_shard} is also a train shard (train shards are 0..{self.num_shards - 1}); "
                "validation must not overlap training",
            )
        if self.tokenizer == "bpe" and not 265 <= self.bpe_vocab_size <= 65536:
            raise ConfigError("bpe_vocab_size", f"must be in 265..65536 (256 bytes + 9 special tokens, uint16 token "
                                                f"files), got {self.bpe_vocab_size}")
        for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip",
                      "sample_temperature"):
            if getattr(self, field) < 0:
                raise ConfigError(field, f"must be >= 0, got {getattr(self, field)}")
        for field in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ConfigError(field, f"must be in [0, 1], got {getattr(self, field)}")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError("warmdown_ratio", f"warmup_ratio + warmdown_ratio must be <= 1, got "
                                                f"{self.warmup_ratio} + {self.warmdown_ratio}")
        if self.eval_tokens < self.max_seq_len + 1:
            raise ConfigError("eval_tokens", f"must hold at least one sequence of max_seq_len + 1 = "
                                             f"{self.max_seq_len + 1} tokens, got {self.eval_tokens}")
        self.grad_accum_steps(world_size)
        return self

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Not named from_dict: `pyflyte run` patches dataclasses_json's lenient from_dict onto input dataclasses.
    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; RunConfig has {', '.join(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Load a preset (YAML or JSON). Fields it leaves out keep their defaults."""
        text = Path(path).read_text()
        values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.from_mapping(values or {})


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A preset file (optional) with overrides on top; an unknown field in either is a ConfigError."""
    config = RunConfig.from_file(path) if path else RunConfig()
    return RunConfig.from_mapping({**config.to_dict(), **overrides})


def parse_override(assignment: str) -> tuple[str, Any]:
    """'field=value' with value typed as YAML reads it (4 -> int, true -> bool, text -> str)."""
    field, sep, value = assignment.partition("=")
    if not sep:
        raise ConfigError(field or assignment, f"override {assignment!r} is not of the form field=value")
    return field.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    """Print a preset with overrides as one JSON document, the form `pyflyte run ... --config` takes inline:

        pyflyte run workflows/nanochat.py main \\
            --config "$(python -m nanochat_flyte.config configs/smoke.yaml data_url=s3://my-bucket/fineweb)"
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("preset", help="a preset file, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    config = load_config(args.preset, **dict(map(parse_override, args.overrides))).validate()
    print(json.dumps(config.to_dict()))


if __name__ == "__main__":
    main()
