"""RunConfig: the one input of the `main` workflow, and of every library entry point.

Defaults reproduce the reference run: a depth-8 nanochat GPT on one T4, context 512, device batch 16,
total batch 65,536 tokens, 1000 iterations on 50 FineWeb-Edu shards with the GPT-2 tokenizer.
Presets in `configs/*.yaml` set only the fields they change; the rest keep these defaults.
"""

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

HF_FINEWEB_EDU_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's copy of DCLM's
LAST_FINEWEB_EDU_SHARD = 1822  # shards are numbered 0..1822; the last one is held out for validation
TOKENIZERS = ("gpt2", "bpe")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu", "mps")


class YamlLoader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans: only true/false. YAML 1.1's yes/no/on/off would turn `humaneval: off` into
    False, and the user's `off` into a confusing `must be a str, got False`."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


class UserError(Exception):
    """A mistake the user can fix (a field, a path, a URL, a file's contents). Our CLIs print its message as one
    line (cli.py) and the workflows show it without a traceback; every module's user errors derive from it."""


class ConfigError(UserError, ValueError):
    """A config field holds a value the run cannot use. The message names the field: `RunConfig.depth: ...`."""

    def __init__(self, field: str, problem: str, owner: str = "RunConfig"):
        self.field = field
        super().__init__(f"{owner}.{field}: {problem}")


# Fields whose words are YAML 1.1 booleans. `pyflyte run --chat_config preset.yaml` reads the file with PyYAML's
# safe_load, not YamlLoader, and hands us `humaneval: off` as False: a boolean means the word it was read from.
ON_OFF_FIELDS = ("humaneval",)


# Allowed types of a field's value, by its annotation: YAML and JSON write 1 for 1.0, and the console's JSON
# (a protobuf Struct) turns every number into a float, so whole floats are accepted for ints and ints for floats.
def coerce(owner: str, field: dataclasses.Field, value: Any) -> Any:
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str,
                                                              "bool": bool}[field.type]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # torch's seeds, Flyte's msgpack and every counter here are 64-bit
                raise ConfigError(field.name, f"must be below 2**63 in size, got {value}", owner)
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `< 0` check and trains to a NaN loss
                raise ConfigError(field.name, f"must be a finite number, got {value}", owner)
            return float(value)
    elif isinstance(value, bool) and field.name in ON_OFF_FIELDS:
        return "on" if value else "off"
    elif isinstance(value, kind):
        return value
    raise ConfigError(field.name, f"must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}", owner)


class StrictConfig:
    """What the workflow configs share: every way into them rejects an unknown field by name, before anything runs.

    The ways in: our loaders (`from_file`, `from_mapping`, the config CLI); `pyflyte run --config` (flytekit calls
    the class's `from_json` when it has one, instead of patching in dataclasses_json's lenient one); and Flyte's type
    engine (the msgpack literal of a launch and the console's JSON on a relaunch), which decodes with mashumaro,
    which calls `__pre_deserialize__` first.
    """

    @classmethod
    def check_fields(cls, values: dict[str, Any]) -> None:
        known = [f.name for f in dataclasses.fields(cls)]
        for name in sorted(set(values) - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"{cls.__name__} has {', '.join(known)}"
            raise ConfigError(name, f"unknown field; {hint}", cls.__name__)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]):
        """A config from plain values; fields left out keep their defaults. Not named from_dict: pyflyte run
        patches dataclasses_json's lenient from_dict onto input dataclasses that have none."""
        if not isinstance(values, dict):
            raise ConfigError("*", f"a config is a mapping of field: value, got {type(values).__name__}", cls.__name__)
        cls.check_fields(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{name: coerce(cls.__name__, fields[name], value) for name, value in values.items()})

    @classmethod
    def __pre_deserialize__(cls, values: dict[str, Any]) -> dict[str, Any]:
        cls.check_fields(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return {name: coerce(cls.__name__, fields[name], value) for name, value in values.items()}

    @classmethod
    def from_json(cls, text: str):
        """What `pyflyte run --config` builds the input with: inline JSON, or a YAML/JSON file flytekit has read.
        Validated here too, so that a bad value stops the command before anything runs, as one line: click's
        BadParameter (pyflyte's CLI toolkit) prints its message; any other exception prints a traceback."""
        try:
            return cls.from_mapping(json.loads(text)).validate()
        except ConfigError as error:
            import click

            raise click.BadParameter(str(error)) from error

    @classmethod
    def from_file(cls, path: str | Path):
        """Load a preset (YAML or JSON). Fields it leaves out keep their defaults."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("*", f"no preset file {str(path)!r}", cls.__name__)
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else yaml.load(text, YamlLoader)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
            problem = " ".join(str(error).split())  # YAML's messages span lines
            raise ConfigError("*", f"{str(path)!r} is not a {'JSON' if path.suffix == '.json' else 'YAML'} "
                                   f"document: {problem}", cls.__name__) from None
        return cls.from_mapping(values or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1):
        raise NotImplementedError


def at_least(config, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}", type(config).__name__)
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}", type(config).__name__)


def one_of(config, field: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise ConfigError(field, f"unknown value {value!r}; choose one of {', '.join(allowed)}", type(config).__name__)


def fraction(config, field: str) -> None:
    if not 0.0 <= getattr(config, field) <= 1.0:
        raise ConfigError(field, f"must be in [0, 1], got {getattr(config, field)}", type(config).__name__)


def non_negative(config, field: str) -> None:
    if getattr(config, field) < 0:
        raise ConfigError(field, f"must be >= 0, got {getattr(config, field)}", type(config).__name__)


@dataclass
class RunConfig(StrictConfig):
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
    residual_scalars: bool = False  # learned per-layer resid and x0 scalars (a later nanochat addition; model.py)

    # --- batch ---
    max_seq_len: int = 512
    device_batch_size: int = 16
    total_batch_size: int = 65536  # tokens per optimizer step, across accumulation and ranks

    # --- optimisation (nanochat's original recipe) ---
    num_iterations: int = 1000
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5  # the x0 scalars' AdamW rate (the resid scalars get 1/100 of it); with residual_scalars
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

    # --- CORE (the DCLM benchmark nanochat reports for base models; core_eval.py) ---
    evaluate_core: bool = True  # score the final checkpoint (evaluate_base_model), where eval_bundle_url is set
    eval_bundle_url: str = EVAL_BUNDLE_URL  # zip or directory, local or any URL; empty: no CORE
    core_max_per_task: int = 500  # a fixed, seeded subset per task (a T4 scores it in minutes); 0: every example
    core_metric_every: int = 0  # also score CORE every N training steps (same subset); 0: only at the end

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on compute capability >= 8.0, float16 + GradScaler below, float32 on CPU
    compile: bool = True  # torch.compile on CUDA

    # --- tracking ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"  # auto: online when a W&B key is present, offline otherwise

    # --- where the checkpoint is kept ---
    save_to: str = ""  # a directory or fsspec URI that gets a copy of the checkpoint at every save; empty: none

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

    @property
    def core_enabled(self) -> bool:
        """Whether the final checkpoint gets a CORE score: asked for, and a bundle to score it on."""
        return self.evaluate_core and bool(self.eval_bundle_url)

    # ------------------------------------------------------------------ validation

    def validate(self, world_size: int = 1) -> "RunConfig":
        """Raise ConfigError naming the first bad field. Cheap, offline: run it before any download."""
        for field in ("depth", "num_shards", "max_seq_len", "device_batch_size", "total_batch_size",
                      "num_iterations", "eval_every", "eval_tokens", "sample_every", "save_every",
                      "download_workers", "sample_max_tokens"):
            at_least(self, field, 1)
        for field in ("val_shard", "seed", "sample_top_k", "bpe_train_chars", "core_max_per_task",
                      "core_metric_every"):
            at_least(self, field, 0)
        one_of(self, "tokenizer", TOKENIZERS)
        one_of(self, "wandb_mode", WANDB_MODES)
        one_of(self, "dtype", DTYPES)
        one_of(self, "device", DEVICES)
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
        for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "grad_clip",
                      "sample_temperature"):
            non_negative(self, field)
        for field in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            fraction(self, field)
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError("warmdown_ratio", f"warmup_ratio + warmdown_ratio must be <= 1, got "
                                                f"{self.warmup_ratio} + {self.warmdown_ratio}")
        if self.eval_tokens < self.max_seq_len + 1:
            raise ConfigError("eval_tokens", f"must hold at least one sequence of max_seq_len + 1 = "
                                             f"{self.max_seq_len + 1} tokens, got {self.eval_tokens}")
        self.grad_accum_steps(world_size)
        return self


CHAT_EVAL_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")
HUMANEVAL_MODES = ("auto", "on", "off")


@dataclass
class ChatConfig(StrictConfig):
    """The chat stage's one input: supervised fine-tuning (SFT) of a base checkpoint on conversations, then the
    chat evaluation. Defaults follow nanochat's SFT: the base run's batch and learning rates, the rates scaled by
    init_lr_frac, a linear warmdown over the second half, one epoch of SmolTalk + 3 x MMLU + 4 x GSM8K.
    A 0 below means "the base run's value"."""

    # --- identity ---
    run_name: str = ""  # empty: the base run's name + "_sft"
    seed: int = 42

    # --- data: the Hugging Face hub (or a mirror) through its parquet listing API ---
    hf_endpoint: str = ""  # empty: $HF_ENDPOINT, else https://huggingface.co
    smoltalk_epochs: float = 1.0  # HuggingFaceTB/smol-smoltalk: general conversations
    mmlu_epochs: float = 3.0  # cais/mmlu auxiliary_train, as multiple choice: teaches answering with a letter
    gsm8k_epochs: float = 4.0  # openai/gsm8k: grade-school math with worked solutions
    max_conversations: int = 0  # 0: the whole mixture; N: a fixed, seeded subset of N (smoke runs)
    val_conversations: int = 1000  # SmolTalk test conversations held out for the validation loss

    # --- training (0 = inherit from the base run) ---
    num_iterations: int = 0  # 0: one epoch of the mixture
    max_seq_len: int = 0
    device_batch_size: int = 0
    total_batch_size: int = 0
    embedding_lr: float = 0.0
    unembedding_lr: float = 0.0
    matrix_lr: float = 0.0
    init_lr_frac: float = 0.8  # SFT starts at this fraction of the (inherited) learning rates
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100  # validation loss on the held-out assistant tokens
    sample_every: int = 200
    sample_max_tokens: int = 64
    save_every: int = 100

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True

    # --- chat evaluation ---
    eval_tasks: str = ",".join(CHAT_EVAL_TASKS)
    eval_max_per_task: int = 0  # 0: every example; N: a fixed, seeded subset of N per task
    eval_batch_size: int = 8  # prompts decoded (or scored) together
    eval_max_tokens: int = 256  # generation budget per GSM8K / HumanEval answer
    humaneval: str = "auto"  # runs model-written code in a sandbox; auto: only where the sandbox works here

    # --- tracking, and where the chat checkpoint is kept ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"
    save_to: str = ""  # a directory or fsspec URI that gets a copy of the chat checkpoint at every save

    @property
    def eval_task_list(self) -> list[str]:
        return [task.strip() for task in self.eval_tasks.split(",") if task.strip()]

    def validate(self, world_size: int = 1) -> "ChatConfig":
        for field in ("seed", "max_conversations", "num_iterations", "max_seq_len", "device_batch_size",
                      "total_batch_size", "eval_max_per_task"):
            at_least(self, field, 0)
        for field in ("val_conversations", "eval_every", "sample_every", "sample_max_tokens", "save_every",
                      "eval_batch_size", "eval_max_tokens"):
            at_least(self, field, 1)
        for field in ("smoltalk_epochs", "mmlu_epochs", "gsm8k_epochs", "embedding_lr", "unembedding_lr", "matrix_lr",
                      "weight_decay", "grad_clip"):
            non_negative(self, field)
        if self.smoltalk_epochs + self.mmlu_epochs + self.gsm8k_epochs == 0:
            raise ConfigError("smoltalk_epochs", "the mixture is empty: give at least one source epochs > 0",
                              "ChatConfig")
        for field in ("init_lr_frac", "warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            fraction(self, field)
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError("warmdown_ratio", f"warmup_ratio + warmdown_ratio must be <= 1, got "
                                                f"{self.warmup_ratio} + {self.warmdown_ratio}", "ChatConfig")
        one_of(self, "dtype", DTYPES)
        one_of(self, "device", DEVICES)
        one_of(self, "wandb_mode", WANDB_MODES)
        one_of(self, "humaneval", HUMANEVAL_MODES)
        if not self.eval_task_list:
            raise ConfigError("eval_tasks", f"no task given; choose from {', '.join(CHAT_EVAL_TASKS)}", "ChatConfig")
        for task in self.eval_task_list:
            if task not in CHAT_EVAL_TASKS:
                raise ConfigError("eval_tasks", f"unknown task {task!r}; choose from {', '.join(CHAT_EVAL_TASKS)}",
                                  "ChatConfig")
        if self.hf_endpoint and not self.hf_endpoint.startswith(("http://", "https://")):
            raise ConfigError("hf_endpoint", f"must be an http(s) URL, got {self.hf_endpoint!r}", "ChatConfig")
        return self


@dataclass
class RLConfig(StrictConfig):
    """Reinforcement learning (RL) of a chat checkpoint on GSM8K (chat_rl.py): nanochat's simplified GRPO. For each
    problem the model samples num_samples answers; an answer with the right final number earns reward 1, others 0;
    each answer's tokens are pushed up or down by its reward minus the mean reward of its group. Defaults are
    nanochat's: 16 problems x 16 answers a step, one epoch of GSM8K's training problems, the learning rate decaying
    linearly to 0. A 0 below means "the SFT run's value"."""

    # --- identity ---
    run_name: str = ""  # empty: the SFT run's name + "_rl"
    seed: int = 42

    # --- data: GSM8K (openai/gsm8k, main) from the hub or a mirror, like ChatConfig ---
    hf_endpoint: str = ""  # empty: $HF_ENDPOINT, else https://huggingface.co
    max_problems: int = 0  # 0: every training problem (7,473); N: a fixed, seeded subset of N (smoke runs)
    eval_problems: int = 400  # GSM8K test problems for the validation pass@1 during training

    # --- rollouts ---
    examples_per_step: int = 16  # problems per optimizer step, over all ranks
    num_samples: int = 16  # answers sampled per problem: the group whose mean reward is the baseline
    max_new_tokens: int = 256  # per answer (fewer where the prompt leaves less of the context)
    temperature: float = 1.0
    top_k: int = 50  # 0: the whole vocabulary

    # --- training (0 = inherit from the SFT run) ---
    num_iterations: int = 0  # 0: one epoch of the problems, examples_per_step a step
    device_batch_size: int = 0  # answers per forward/backward pass
    decode_batch_size: int = 0  # answers decoded together; 0: all of a step's (examples_per_step x num_samples / ranks)
    embedding_lr: float = 0.0
    unembedding_lr: float = 0.0
    matrix_lr: float = 0.0
    # of the SFT run's rates: nanochat's RL starts at 0.05 of the base rates, its SFT at 0.8 of them
    init_lr_frac: float = 0.0625
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping (nanochat's RL does not clip)
    eval_every: int = 60  # validation pass@1 (greedy) on eval_problems
    sample_every: int = 60
    sample_max_tokens: int = 64
    save_every: int = 60

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True

    # --- chat evaluation of the RL checkpoint (as ChatConfig's) ---
    eval_tasks: str = ",".join(CHAT_EVAL_TASKS)
    eval_max_per_task: int = 0
    eval_batch_size: int = 8
    eval_max_tokens: int = 256
    humaneval: str = "auto"

    # --- tracking, and where the RL checkpoint is kept ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"
    save_to: str = ""

    @property
    def eval_task_list(self) -> list[str]:
        return [task.strip() for task in self.eval_tasks.split(",") if task.strip()]

    def chat_eval_config(self) -> "ChatConfig":
        """The ChatConfig that the chat evaluation of the RL checkpoint runs with."""
        return ChatConfig(seed=self.seed, hf_endpoint=self.hf_endpoint, device=self.device,
                          **{field: getattr(self, field) for field in ("eval_tasks", "eval_max_per_task",
                                                                       "eval_batch_size", "eval_max_tokens",
                                                                       "humaneval")})

    def validate(self) -> "RLConfig":
        for field in ("seed", "max_problems", "num_iterations", "device_batch_size", "decode_batch_size", "top_k",
                      "eval_max_per_task"):
            at_least(self, field, 0)
        for field in ("eval_problems", "examples_per_step", "max_new_tokens", "eval_every", "sample_every",
                      "sample_max_tokens", "save_every", "eval_batch_size", "eval_max_tokens"):
            at_least(self, field, 1)
        at_least(self, "num_samples", 2)  # the baseline is the group's mean: one answer alone learns nothing
        for field in ("temperature", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
            non_negative(self, field)
        if self.temperature == 0:
            raise ConfigError("temperature", "must be > 0: greedy answers to one problem are all the same, so every "
                                             "advantage is 0", "RLConfig")
        fraction(self, "init_lr_frac")
        if 0 < self.max_problems < self.examples_per_step:
            raise ConfigError("max_problems", f"{self.max_problems} problems do not fill one step of "
                                              f"examples_per_step {self.examples_per_step}", "RLConfig")
        one_of(self, "dtype", DTYPES)
        one_of(self, "device", DEVICES)
        one_of(self, "wandb_mode", WANDB_MODES)
        try:  # the evaluation fields, checked as the chat stage checks them
            self.chat_eval_config().validate()
        except ConfigError as error:
            raise ConfigError(error.field, str(error).split(": ", 1)[1], "RLConfig") from None
        if self.hf_endpoint and not self.hf_endpoint.startswith(("http://", "https://")):
            raise ConfigError("hf_endpoint", f"must be an http(s) URL, got {self.hf_endpoint!r}", "RLConfig")
        return self


def load_config(path: str | Path | None = None, kind: type[StrictConfig] = RunConfig, **overrides: Any):
    """A preset file (optional) with overrides on top; an unknown field in either is a ConfigError."""
    config = kind.from_file(path) if path else kind()
    return kind.from_mapping({**config.to_dict(), **overrides})


def parse_override(assignment: str, owner: str = "RunConfig") -> tuple[str, Any]:
    """'field=value' with value typed as YAML reads it (4 -> int, true -> bool, text -> str); a value YAML cannot
    read (`run_name=@me`, `eval_tasks=,,`) is taken as the text it is."""
    field, sep, value = assignment.partition("=")
    if not sep or not field.strip():
        raise ConfigError(field.strip() or "*", f"override {assignment!r} is not of the form field=value", owner)
    try:
        return field.strip(), yaml.load(value, YamlLoader)
    except yaml.YAMLError:
        return field.strip(), value


def main(argv: list[str] | None = None) -> None:
    """Check a preset with overrides and write it as one JSON document, the form `pyflyte run ... --config` takes:

        python -m nanochat_flyte.config configs/smoke.yaml data_url=s3://my-bucket/fineweb -o run.json \
            && pyflyte run workflows/nanochat.py main --config run.json

    A bad field stops the `&&` chain with one line naming it; without -o the JSON goes to stdout.
    """
    from nanochat_flyte.cli import ArgumentParser  # cli imports this module

    parser = ArgumentParser("nanochat_flyte.config", description=main.__doc__.splitlines()[0])
    parser.add_argument("preset", help="a preset file, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--chat", action="store_true", help="a ChatConfig preset (the chat stage), not a RunConfig")
    kinds.add_argument("--rl", action="store_true", help="an RLConfig preset (reinforcement learning on GSM8K)")
    parser.add_argument("-o", "--output", type=Path, help="write the JSON to this file instead of stdout")
    args = parser.parse_intermixed_args(argv)  # field=value overrides may come before or after the options
    kind = ChatConfig if args.chat else RLConfig if args.rl else RunConfig
    overrides = dict(parse_override(assignment, kind.__name__) for assignment in args.overrides)
    config = load_config(args.preset, kind, **overrides).validate()
    text = json.dumps(config.to_dict())
    if args.output:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
        except OSError as error:
            raise ConfigError("*", f"cannot write -o {str(args.output)!r}: {error.strerror}", kind.__name__) from None
    else:
        print(text)


if __name__ == "__main__":
    from nanochat_flyte import config  # the package's module, not __main__: its error classes are those cli catches
    from nanochat_flyte.cli import run

    run(config.main)
