"""The three configs a run is made of, each the one input of its stage, and presets' loader:
- `RunConfig`: pretraining (the `main` workflow). Defaults reproduce the reference run: a depth-8 nanochat GPT on one
  T4, context 512, device batch 16, total batch 65,536 tokens, 1000 iterations on 50 FineWeb-Edu shards with the
  GPT-2 tokenizer.
- `ChatConfig`: supervised fine-tuning (SFT) of a base checkpoint, then the chat evaluation.
- `RLConfig`: reinforcement learning of a chat checkpoint on GSM8K, then the chat evaluation.
Presets in `configs/*.yaml` set only the fields they change; the rest keep these defaults. Imports schema.py and
errors.py only.
"""

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nanochat_flyte.errors import ConfigError
from nanochat_flyte.schema import (
    StrictConfig,
    at_least,
    fraction,
    no_surrounding_space,
    non_negative,
    one_of,
    schedule_fits,
)

HF_FINEWEB_EDU_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's copy of DCLM's
EVAL_BUNDLE_MAX_SHOTS = 10  # its tasks show up to 10 solved examples, drawn from the other items evaluated
LAST_FINEWEB_EDU_SHARD = 1822  # shards are numbered 0..1822; the last one is held out for validation
# Shards are named with 5 digits (shard_00000.parquet .. shard_99999.parquet, download.shard_name): another source
# may hold more than FineWeb-Edu's 1823 (0..1822), but not more than its names count
MAX_SHARDS = 100_000
TOKENIZERS = ("gpt2", "bpe")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu", "mps")
# torch.compile's modes; "reduce-overhead" and "max-autotune" replay the step's kernels as CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
WIDTH_PER_LAYER = 64  # nanochat's one knob: model_dim = depth * 64 (its aspect ratio)
HEAD_DIM = 128  # nanochat keeps heads 128 wide and adds heads as the model widens
# The nanochat family goes to depth ~32-34 (d32: 1.9B parameters). As width grows with depth, the blocks' parameters
# grow as depth cubed (12 x depth x width^2): depth 64 is ~13B of them. A larger depth is a slip that would otherwise
# be found only when the model is built, after the data is prepared.
MAX_DEPTH = 64
# W&B refuses project names with these characters, or longer than 128 (wandb.sdk.wandb_settings.validate_project):
# a URL's separators. The entity is the segment before the project in every W&B path (entity/project/run), and
# cannot hold them either.
WANDB_NAME_FORBIDDEN = "/\\#?%:"
WANDB_PROJECT_MAX = 128


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
    residual_scalars: bool = False  # learned per-layer resid and x0 scalars (a later nanochat addition; model/gpt.py)

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
    weight_decay: float = 0.0  # on the embeddings, the head and the Muon matrices alike
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

    # --- CORE (the DCLM benchmark nanochat reports for base models; evaluation/core.py) ---
    evaluate_core: bool = True  # score the final checkpoint (evaluate_base_model), where eval_bundle_url is set
    eval_bundle_url: str = EVAL_BUNDLE_URL  # zip or directory, local or any URL; empty: no CORE
    core_max_per_task: int = 500  # a fixed, seeded subset per task (a T4 scores it in minutes); 0: every example
    core_metric_every: int = 0  # also score CORE every N training steps (same subset); 0: only at the end

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on compute capability >= 8.0, float16 + GradScaler below, float32 on CPU
    compile: bool = True  # torch.compile on CUDA
    # torch.compile's mode. reduce-overhead records each micro-batch's forward and backward as CUDA graphs: one
    # launch for the whole graph instead of one per kernel, for a host that cannot keep up with a fast GPU.
    compile_mode: str = "default"
    # 0: the loss from the logits of every position at once. N: lm_head, softcap and cross-entropy N tokens at a
    # time, without keeping the logits (less memory; a training loss gets its gradients in the same pass).
    loss_chunk_tokens: int = 0
    muon_batched: bool = False  # Muon's update for all matrices of one shape at once, in batched products

    # --- tracking ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"  # auto: online when a W&B key is present, offline otherwise

    # --- where the checkpoint is kept ---
    save_to: str = ""  # a directory or fsspec URI that gets a copy of the checkpoint at every save; empty: none

    # ------------------------------------------------------------------ derived values

    def resolved(self, now: datetime | None = None) -> "RunConfig":
        """A copy with the run name filled in (a timestamp, when none is set). Once a run has its name, calling it
        again keeps that name."""
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
                      "download_workers", "sample_max_tokens", "bpe_train_chars"):
            at_least(self, field, 1)
        for field in ("val_shard", "seed", "sample_top_k", "core_max_per_task",
                      "core_metric_every", "loss_chunk_tokens"):
            at_least(self, field, 0)
        one_of(self, "tokenizer", TOKENIZERS)
        one_of(self, "wandb_mode", WANDB_MODES)
        one_of(self, "dtype", DTYPES)
        one_of(self, "device", DEVICES)
        one_of(self, "compile_mode", COMPILE_MODES)
        if not self.compile and self.compile_mode != "default":  # it would be ignored without a word
            raise ConfigError("compile_mode", f"{self.compile_mode!r} needs compile true; set compile: true, "
                                              f"or leave compile_mode at 'default'")
        if not self.data_url.strip():
            raise ConfigError("data_url", "must not be empty")
        self.check_shard_bounds()
        if self.val_shard < self.num_shards:
            raise ConfigError(
                "val_shard",
                f"shard {self.val_shard} is also a train shard (train shards are 0..{self.num_shards - 1}); "
                "validation must not overlap training",
            )
        if self.core_metric_every and not self.core_enabled:  # it would be off without a word
            raise ConfigError("core_metric_every", "CORE during training needs evaluate_core on and an "
                                                   "eval_bundle_url; set both, or 0")
        if (self.core_enabled and self.eval_bundle_url == EVAL_BUNDLE_URL
                and 0 < self.core_max_per_task <= EVAL_BUNDLE_MAX_SHOTS):  # (another: once read, setup.base_run)
            raise ConfigError("core_max_per_task", f"{self.core_max_per_task} items per task leave the CORE bundle's "
                                                   f"{EVAL_BUNDLE_MAX_SHOTS}-shot prompts too few others to draw their "
                                                   f"examples from: give at least {EVAL_BUNDLE_MAX_SHOTS + 1}, or 0")
        if self.tokenizer == "bpe" and not 265 <= self.bpe_vocab_size <= 65536:
            raise ConfigError("bpe_vocab_size", f"must be in 265..65536 (256 bytes + 9 special tokens, uint16 token "
                                                f"files), got {self.bpe_vocab_size}")
        for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "grad_clip",
                      "sample_temperature"):
            non_negative(self, field)
        if not (self.embedding_lr or self.unembedding_lr or self.matrix_lr or self.residual_scalars and self.scalar_lr):
            raise ConfigError("matrix_lr", "embedding_lr, unembedding_lr and matrix_lr are all 0 (and scalar_lr, or "
                                           "no residual_scalars): training would not change the model")
        for field in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            fraction(self, field)
        schedule_fits(self)
        for field in ("save_to", "data_url", "eval_bundle_url"):
            no_surrounding_space(self, field)
        if self.eval_tokens < self.max_seq_len + 1:
            raise ConfigError("eval_tokens", f"must hold at least one sequence of max_seq_len + 1 = "
                                             f"{self.max_seq_len + 1} tokens, got {self.eval_tokens}")
        self.grad_accum_steps(world_size)
        model_width(self.depth)
        check_wandb_names(self)
        return self

    def check_shard_bounds(self) -> None:
        """Shard numbers a source can have: FineWeb-Edu's at the default data_url, else what 5-digit names count. The
        train shards come before val_shard, so num_shards is at most the last shard's number. Checked before their
        overlap, which a too-large num_shards would be named as."""
        last = LAST_FINEWEB_EDU_SHARD if self.data_url.rstrip("/") == HF_FINEWEB_EDU_URL else MAX_SHARDS - 1
        source = (f"FineWeb-Edu has shards 0..{last}" if last == LAST_FINEWEB_EDU_SHARD
                  else f"shard names have 5 digits: shard_00000..shard_{last}")
        if self.num_shards > last:
            raise ConfigError("num_shards", f"must be <= {last} ({source}, and val_shard is apart), got "
                                            f"{self.num_shards}")
        if self.val_shard > last:
            raise ConfigError("val_shard", f"must be <= {last} ({source}), got {self.val_shard}")


def model_width(depth: int) -> tuple[int, int]:
    """nanochat's one-knob model size: (model_dim, n_head) at `depth` (8 -> dim 512, 4 heads of 128). Raises
    ConfigError when depth is beyond MAX_DEPTH, or when the width does not split into equal heads: an odd depth d does
    only where (d + 1) / 2 divides 64 (1, 3, 7, 15, 31, 63)."""
    model_dim = depth * WIDTH_PER_LAYER
    if depth > MAX_DEPTH:
        raise ConfigError("depth", f"must be <= {MAX_DEPTH} (nanochat's largest runs are ~32), got {depth}: width "
                                   f"{model_dim:,} and ~{12 * depth * model_dim**2:.2g} parameters in its blocks")
    n_head = max(1, math.ceil(model_dim / HEAD_DIM))
    if model_dim % n_head:
        raise ConfigError("depth", f"{depth} gives model_dim {model_dim}, which does not split into {n_head} equal "
                                   f"heads; use an even depth ({depth - 1} or {depth + 1}), or 1, 3, 7, 15, 31, 63")
    return model_dim, n_head


CHAT_EVAL_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")
HUMANEVAL_MODES = ("auto", "on", "off")


def check_wandb_names(config) -> None:
    """wandb_project and wandb_entity are names W&B takes: a refused one would fail W&B's start at training time,
    and the run would go on without tracking."""
    owner = type(config).__name__
    for field in ("wandb_project", "wandb_entity"):
        name = getattr(config, field)
        if bad := sorted(set(name) & set(WANDB_NAME_FORBIDDEN)):
            raise ConfigError(field, f"{name!r} contains {' '.join(bad)}, which W&B refuses in its names (any of "
                                     f"{' '.join(WANDB_NAME_FORBIDDEN)})", owner)
    if len(config.wandb_project) > WANDB_PROJECT_MAX:
        raise ConfigError("wandb_project", f"W&B takes at most {WANDB_PROJECT_MAX} characters, got "
                                           f"{len(config.wandb_project)}", owner)


def http_url_problem(url: str) -> str | None:
    """Why `url` is no http(s) URL of a server (a scheme and a host), or None when it is one."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # (.port raises for one that is no number)
    except ValueError as error:  # an unclosed IPv6 bracket, a port that is no number
        return str(error)
    if parts.scheme not in ("http", "https"):
        return "not http(s)"
    return None if host else "no host"


def task_list(tasks: str) -> list[str]:
    """The tasks of a comma-separated eval_tasks string, in its order."""
    return [task.strip() for task in tasks.split(",") if task.strip()]


@dataclass
class ChatStageConfig(StrictConfig):
    """What the two chat stages' configs share: they start from a checkpoint, read the hub (or a mirror), train with
    rates inherited from the run before (a 0 means "the previous run's value"), then run the chat evaluation."""

    # --- identity ---
    run_name: str = ""  # empty: the previous run's name + "_sft" or "_rl"
    seed: int = 42

    # --- data: the Hugging Face hub (or a mirror) through its parquet listing API ---
    hf_endpoint: str = ""  # empty: $HF_ENDPOINT, else https://huggingface.co

    # --- training (0 = inherit from the previous run) ---
    num_iterations: int = 0  # 0: one epoch of the data
    device_batch_size: int = 0
    embedding_lr: float = 0.0
    unembedding_lr: float = 0.0
    matrix_lr: float = 0.0
    init_lr_frac: float = 0.8  # the stage starts at this fraction of the (inherited) learning rates
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    sample_every: int = 200
    sample_max_tokens: int = 64
    save_every: int = 100

    # --- hardware ---
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True

    # --- chat evaluation of the stage's checkpoint ---
    eval_tasks: str = ",".join(CHAT_EVAL_TASKS)
    eval_max_per_task: int = 0  # 0: every example; N: a fixed, seeded subset of N per task
    eval_batch_size: int = 8  # prompts decoded (or scored) together
    eval_max_tokens: int = 512  # generation budget per GSM8K / HumanEval answer (nanochat chat_eval's)
    humaneval: str = "auto"  # runs model-written code in a sandbox; auto: only where the sandbox works here

    # --- tracking, and where the stage's checkpoint is kept ---
    wandb_project: str = "nanochat"
    wandb_entity: str = ""
    wandb_mode: str = "auto"
    save_to: str = ""  # a directory or fsspec URI that gets a copy of the checkpoint at every save

    @property
    def eval_task_list(self) -> list[str]:
        return task_list(self.eval_tasks)

    def loop_config(self, previous: RunConfig, suffix: str, **stage_fields: Any) -> RunConfig:
        """The training loop's RunConfig for this stage, on top of the run before it: its model, context and batch,
        its learning rates where this config leaves them at 0, every rate (the residual scalars' too) scaled by
        init_lr_frac; this config's schedule length, evaluation, samples (greedy), saves, hardware and tracking;
        no CORE (it scores base models). stage_fields: what the stage sets besides (batch, schedule shape)."""
        rates = {field: (getattr(self, field) or getattr(previous, field)) * self.init_lr_frac
                 for field in ("embedding_lr", "unembedding_lr", "matrix_lr")}
        return dataclasses.replace(
            previous, run_name=self.run_name or f"{previous.run_name}_{suffix}", seed=self.seed, **rates,
            scalar_lr=previous.scalar_lr * self.init_lr_frac, num_iterations=self.num_iterations or 1,
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, eval_every=self.eval_every,
            sample_every=self.sample_every, sample_max_tokens=self.sample_max_tokens, sample_temperature=0.0,
            save_every=self.save_every, device=self.device, dtype=self.dtype, compile=self.compile,
            compile_mode=previous.compile_mode if self.compile else "default",  # (its mode needs the compile)
            wandb_project=self.wandb_project, wandb_entity=self.wandb_entity, wandb_mode=self.wandb_mode,
            save_to=self.save_to, evaluate_core=False, core_metric_every=0, **stage_fields)

    def validate_shared(self) -> None:
        """The checks of the fields above; each stage's validate() adds its own."""
        owner = type(self).__name__
        for field in ("seed", "num_iterations", "device_batch_size", "eval_max_per_task"):
            at_least(self, field, 0)
        for field in ("eval_every", "sample_every", "sample_max_tokens", "save_every", "eval_batch_size",
                      "eval_max_tokens"):
            at_least(self, field, 1)
        for field in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
            non_negative(self, field)
        fraction(self, "init_lr_frac")
        if self.init_lr_frac == 0:
            raise ConfigError("init_lr_frac", "must be > 0: it scales every learning rate of the stage, so 0 would "
                                              "leave the model as it starts", owner)
        for field in ("save_to", "hf_endpoint"):
            no_surrounding_space(self, field)
        one_of(self, "dtype", DTYPES)
        one_of(self, "device", DEVICES)
        one_of(self, "wandb_mode", WANDB_MODES)
        one_of(self, "humaneval", HUMANEVAL_MODES)
        if not self.eval_task_list:
            raise ConfigError("eval_tasks", f"no task given; choose from {', '.join(CHAT_EVAL_TASKS)}", owner)
        for task in self.eval_task_list:
            if task not in CHAT_EVAL_TASKS:
                raise ConfigError("eval_tasks", f"unknown task {task!r}; choose from {', '.join(CHAT_EVAL_TASKS)}",
                                  owner)
        if self.hf_endpoint and (problem := http_url_problem(self.hf_endpoint)):
            raise ConfigError("hf_endpoint", f"must be an http(s) URL with a host (https://huggingface.co or a "
                                             f"mirror's), got {self.hf_endpoint!r} ({problem})", owner)
        check_wandb_names(self)


@dataclass
class ChatConfig(ChatStageConfig):
    """The chat stage's one input: supervised fine-tuning (SFT) of a base checkpoint on conversations, then the
    chat evaluation. Defaults follow nanochat's SFT: the base run's batch and learning rates, the rates scaled by
    init_lr_frac, a linear warmdown over the second half, one epoch of SmolTalk + 3 x MMLU + 4 x GSM8K."""

    # --- data ---
    smoltalk_epochs: float = 1.0  # HuggingFaceTB/smol-smoltalk: general conversations
    mmlu_epochs: float = 3.0  # cais/mmlu auxiliary_train, as multiple choice: teaches answering with a letter
    gsm8k_epochs: float = 4.0  # openai/gsm8k: grade-school math with worked solutions
    max_conversations: int = 0  # 0: the whole mixture; N: a fixed, seeded subset of N (smoke runs)
    val_conversations: int = 1000  # SmolTalk test conversations held out for the validation loss

    # --- training (0 = inherit from the base run) ---
    max_seq_len: int = 0
    total_batch_size: int = 0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    load_optimizer: bool = True  # start from the base run's optimizer states (Adam's moments, Muon's momentum), as
    #                              nanochat's SFT does (it found fresh ones slightly worse); false: fresh states

    def validate(self) -> "ChatConfig":
        self.validate_shared()
        for field in ("max_conversations", "max_seq_len", "total_batch_size"):
            at_least(self, field, 0)
        at_least(self, "val_conversations", 1)
        for field in ("smoltalk_epochs", "mmlu_epochs", "gsm8k_epochs"):
            non_negative(self, field)
        if self.smoltalk_epochs + self.mmlu_epochs + self.gsm8k_epochs == 0:
            raise ConfigError("smoltalk_epochs", "the mixture is empty: give at least one source epochs > 0",
                              "ChatConfig")
        for field in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            fraction(self, field)
        schedule_fits(self)
        return self

    def chat_eval_config(self) -> "ChatConfig":
        """The ChatConfig that the chat evaluation of this stage's checkpoint runs with: this one."""
        return self


@dataclass
class RLConfig(ChatStageConfig):
    """Reinforcement learning (RL) of a chat checkpoint on GSM8K (training/rl.py): nanochat's simplified GRPO. For
    each problem the model samples num_samples answers; an answer with the right final number earns reward 1, others
    0; each answer's tokens are pushed up or down by its reward minus the mean reward of its group. Defaults are
    nanochat's: 16 problems x 16 answers a step, one epoch of GSM8K's training problems, the learning rate decaying
    linearly to 0."""

    # --- data: GSM8K (openai/gsm8k, main) ---
    max_problems: int = 0  # 0: every training problem (7,473); N: a fixed, seeded subset of N (smoke runs)
    eval_problems: int = 400  # GSM8K test problems for the validation pass@1 during training

    # --- rollouts ---
    examples_per_step: int = 16  # problems per optimizer step, over all ranks
    num_samples: int = 16  # answers sampled per problem: the group whose mean reward is the baseline
    max_new_tokens: int = 256  # per answer (fewer where the prompt leaves less of the context)
    temperature: float = 1.0
    top_k: int = 50  # 0: the whole vocabulary

    # --- training (0 = inherit from the SFT run); fields of ChatStageConfig with RL's own defaults ---
    decode_batch_size: int = 0  # answers decoded together; 0: all of a step's (examples_per_step x num_samples / ranks)
    # of the SFT run's rates: nanochat's RL starts at 0.05 of the base rates, its SFT at 0.8 of them
    init_lr_frac: float = 0.0625
    grad_clip: float = 0.0  # nanochat's RL does not clip
    eval_every: int = 60  # validation pass@1 (greedy) on eval_problems
    sample_every: int = 60
    save_every: int = 60

    def chat_eval_config(self) -> "ChatConfig":
        """The ChatConfig that the chat evaluation of the RL checkpoint runs with: its eval settings."""
        return ChatConfig(seed=self.seed, hf_endpoint=self.hf_endpoint, device=self.device,
                          **{field: getattr(self, field) for field in ("eval_tasks", "eval_max_per_task",
                                                                       "eval_batch_size", "eval_max_tokens",
                                                                       "humaneval")})

    def validate(self) -> "RLConfig":
        self.validate_shared()
        for field in ("max_problems", "decode_batch_size", "top_k"):
            at_least(self, field, 0)
        for field in ("eval_problems", "examples_per_step", "max_new_tokens"):
            at_least(self, field, 1)
        at_least(self, "num_samples", 2)  # the baseline is the group's mean: one answer alone learns nothing
        non_negative(self, "temperature")
        if self.temperature == 0:
            raise ConfigError("temperature", "must be > 0: greedy answers to one problem are all the same, so every "
                                             "advantage is 0", "RLConfig")
        if 0 < self.max_problems < self.examples_per_step:
            raise ConfigError("max_problems", f"{self.max_problems} problems do not fill one step of "
                                              f"examples_per_step {self.examples_per_step}", "RLConfig")
        if self.device_batch_size:  # 0: the SFT run's, checked with it (training/rl.py)
            self.check_micro_batches(self.device_batch_size)
        return self

    def check_micro_batches(self, device_batch_size: int, world_size: int = 1) -> None:
        """A step's answers (examples_per_step x num_samples) fill whole micro-batches of device_batch_size rows on
        each of world_size ranks."""
        answers = self.examples_per_step * self.num_samples
        if answers % (device_batch_size * world_size):
            ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise ConfigError("device_batch_size", f"the {answers} answers of a step (examples_per_step x num_samples)"
                                                   f" are not a whole number of micro-batches of {device_batch_size}"
                                                   f"{ranks}", "RLConfig")


STAGE_CONFIGS = {"base": "RunConfig", "chat": "ChatConfig", "rl": "RLConfig"}  # where a user sets a stage's fields


def load_config(path: str | Path | None = None, kind: type[StrictConfig] = RunConfig, **overrides: Any):
    """A preset file (optional: None) with overrides on top; an unknown field in either is a ConfigError."""
    if path is not None and not str(path).strip():  # `--config "$PRESET"` with the variable unset
        raise ConfigError("*", "empty: give a preset file (YAML or JSON)", kind.__name__)
    config = kind.from_file(path) if path is not None else kind()
    return kind.from_mapping({**config.to_dict(), **overrides})
