"""The training loop, shared by pretraining, supervised fine-tuning (SFT) and RL: `Trainer`.

One loop for every setting: CPU, MPS, one GPU, or N GPUs under DDP (rank 0 alone writes and logs). Per step:
grad_accum_steps micro-batches forward/backward, one optimizer step. At step boundaries: validation, samples and
checkpoints. In a single-process run an out-of-memory error (CUDA's or the CPU allocator's) halves the device batch
(and doubles the accumulation, so the optimizer sees the same batch) and re-runs the step. The same gradient in
pretraining, whose rows all count the same number of tokens; SFT and RL average their loss over each micro-batch's
trained tokens, as nanochat does, so other micro-batches weight the step's tokens a little differently.

A `Phase` brings what differs between the stages: the batches, their loss (next-token cross-entropy unless it
says otherwise), the validation metric, the samples and the starting weights (`Pretraining` in pretrain.py, with
`train()`, the pretraining run; `FineTuning` in sft.py; `ReinforcementLearning` in rl.py, whose batches are answers
it samples and rewards). The Trainer
does the rest: device and precision, DDP, optimizers and schedules, the OOM fallback, resuming, W&B and
metrics.jsonl, checkpoints, the report card.

    nanochat train --config configs/X.yaml --data-dir DATA --out-dir OUT [--resume-dir CKPT]
    torchrun --nproc_per_node=2 -m nanochat_flyte train --config configs/X.yaml --data-dir DATA --out-dir OUT

Resuming (--resume-dir, or `main(resume_from=...)` in the workflow) continues from the checkpoint's step with the
optimizer, data position and RNG states it saved. With a larger num_iterations it extends a finished run: the LR
schedule is that of the new num_iterations, so a run that had finished its warmdown returns to the flat learning
rate and warms down again over the last warmdown_ratio of the new length.
"""

import contextlib
import dataclasses
import inspect
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanochat_flyte.config import STAGE_CONFIGS, RunConfig
from nanochat_flyte.errors import ConfigError, UserError
from nanochat_flyte.files import write_json
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.model.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    TRAINING_STATE_FILE,
    check_save_to,
    load_checkpoint,
    publish_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from nanochat_flyte.model.device import (
    Precision,
    compiled,
    mfu,
    peak_flops,
    replays_cuda_graphs,
    select_device,
    select_precision,
)
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.model.optim import apply_schedules, build_optimizers, lr_multiplier
from nanochat_flyte.reporting.report import write_report
from nanochat_flyte.reporting.results import RESULTS_FILE
from nanochat_flyte.reporting.tracking import Tracker
from nanochat_flyte.training.resume import (
    check_not_past,
    check_out_dir,
    check_resumed_stage,
    check_same_model,
)

LOSS_EMA_BETA = 0.9  # smoothing of the logged loss: roughly the mean of the last 10 steps
# Steps in a row whose loss is inf/NaN before the run stops as diverged. An fp16 forward overflow now and then skips a
# step and training goes on; 20 in a row is a run whose weights have gone (in bf16 or fp32 they are NaN after one).
DIVERGED_AFTER_STEPS = 20
# The step_metrics key under which a phase whose model writes its own data (RL's rollouts) reports the seconds the
# step spent writing it: tok/s and MFU leave them out, as they measure training; the step's dt and the ETA keep them.
SAMPLING_SECONDS = "train/sampling_s"
DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters  # which switches this torch's DDP takes


class TrainingDiverged(UserError):
    """The loss stayed inf/NaN: more steps would spend the GPU for nothing, and a retry would replay the same data
    from the same weights. A user error: the run stops in one line, not retried, naming the checkpoint to go back to."""


# ---------------------------------------------------------------------- one optimizer step


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping; inf/nan on an fp16 overflow
    skipped: bool  # the grad scaler found inf/nan gradients and no optimizer stepped
    grad_scale: float | None = None  # fp16: the loss scale this step's gradients were computed at


def next_token_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """The mean cross-entropy of a batch's (inputs, targets): pretraining's and SFT's loss."""
    inputs, targets = batch
    return model(inputs, targets)


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterator,
               grad_accum_steps: int, precision: Precision, grad_scaler: torch.amp.GradScaler | None,
               grad_clip: float, loss_of: Callable[[torch.nn.Module, tuple], torch.Tensor] = next_token_loss,
               cuda_graphs: bool = False) -> StepResult:
    """Forward/backward over grad_accum_steps micro-batches (accumulate_gradients), then one step of every optimizer
    (apply_gradients). loss_of(model, batch) is a micro-batch's loss (next_token_loss, or RL's policy-gradient
    loss). The Trainer calls the two halves itself: after an out-of-memory error it re-runs the first alone, at half
    the device batch. The throughput benchmarks time the whole step through this function.

    The host waits for the GPU once per step: for the loss and the gradient norm together (with fp16, before the
    optimizers, which run only if the norm is finite). Every other wait leaves the GPU idle while the host catches up.

    cuda_graphs: the model was compiled into CUDA graphs (compile_mode reduce-overhead), whose outputs live in
    memory that the next replay overwrites. The gradients are then kept allocated between steps, so that autograd
    adds each micro-batch's gradients into them instead of adopting a graph's output as .grad, which the next
    micro-batch's replay would overwrite (pytorch/pytorch#169545)."""
    loss = accumulate_gradients(model, batches, grad_accum_steps, precision, grad_scaler, loss_of, cuda_graphs)
    return apply_gradients(model, optimizers, loss, grad_scaler, grad_clip, cuda_graphs)


def accumulate_gradients(model: torch.nn.Module, batches: Iterator, grad_accum_steps: int, precision: Precision,
                         grad_scaler: torch.amp.GradScaler | None,
                         loss_of: Callable[[torch.nn.Module, tuple], torch.Tensor] = next_token_loss,
                         cuda_graphs: bool = False) -> torch.Tensor:
    """train_step's first half: the gradients of the mean loss over grad_accum_steps micro-batches, summed into
    .grad (scaled, with fp16); returns that mean loss (averaged over the ranks under DDP), on the device."""
    if cuda_graphs:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    micro_losses = []
    for micro_step in range(grad_accum_steps):
        batch = next(batches)
        # under DDP, all-reduce the gradients once, after the last micro-batch
        last_micro_step = micro_step == grad_accum_steps - 1
        no_sync = isinstance(model, DistributedDataParallel) and not last_micro_step
        with model.no_sync() if no_sync else contextlib.nullcontext():
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last one's outputs are done with
            with precision.autocast():
                loss = loss_of(model, batch)
            micro_losses.append(loss.detach().clone() if cuda_graphs else loss.detach())
            loss = loss / grad_accum_steps  # the gradient of the mean over the whole batch
            (grad_scaler.scale(loss) if grad_scaler else loss).backward()
    loss = torch.stack(micro_losses).mean()
    if dist.is_initialized():
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        loss /= dist.get_world_size()
    return loss


def apply_gradients(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], loss: torch.Tensor,
                    grad_scaler: torch.amp.GradScaler | None, grad_clip: float, cuda_graphs: bool = False
                    ) -> StepResult:
    """train_step's second half: clip, step every optimizer (unless fp16 overflowed), clear the gradients."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if grad_scaler:
        for optimizer in optimizers:  # clip (and step) the true gradients, not the scaled ones
            grad_scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.to(loss.device)  # (on the CPU where no parameter had a gradient)
    if grad_scaler:
        # the scale before update(), read in the same wait (get_scale() would wait again, for the optimizers; its
        # private twin _get_scale_async returns the scale tensor without that wait, and torch has no public one)
        loss_value, norm_value, scale_value = torch.stack([loss, grad_norm, grad_scaler._get_scale_async()]).tolist()
        # skip the whole step on inf/nan, not only the optimizers whose own gradients overflowed. The gradients are
        # unscaled already and the verdict is taken: optimizer.step() directly, where grad_scaler.step() would wait
        # for the GPU again, per optimizer, to read the same verdict.
        skipped = not math.isfinite(norm_value)
        if not skipped:
            for optimizer in optimizers:
                optimizer.step()
        grad_scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
    else:
        skipped, scale_value = False, None
        for optimizer in optimizers:
            optimizer.step()
        loss_value, norm_value = torch.stack([loss, grad_norm]).tolist()
    model.zero_grad(set_to_none=not cuda_graphs)
    return StepResult(loss=loss_value, grad_norm=norm_value, skipped=skipped, grad_scale=scale_value)


def build_model(config: RunConfig, vocab_size: int, device: torch.device) -> GPT:
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run of a config
    model = GPT(GPTConfig.from_depth(config.depth, vocab_size, config.max_seq_len, config.residual_scalars),
                loss_chunk_tokens=config.loss_chunk_tokens).to(device)
    model.init_weights()
    return model


def compile_model(model: GPT, config: RunConfig, device: torch.device) -> torch.nn.Module:
    # compile pays off only on CUDA; on CPU its start-up time exceeds any gain in a run that fits a CPU
    if not (config.compile and device.type == "cuda"):
        return model
    return compiled(model, config.compile_mode)


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None


# ---------------------------------------------------------------------- loop state


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides weights, optimizers and data: saved in checkpoints."""

    device_batch_size: int  # can shrink after an out-of-memory error
    loss_ema: float = 0.0
    loss_ema_steps: int = 0  # the losses folded into loss_ema: the finite ones (an fp16 overflow's NaN is left out)
    val_metric: float | None = None  # last evaluation (bpb when pretraining, loss in SFT, pass@1 in RL)
    best_val_metric: float | None = None  # the lowest (the highest where the phase's metric is higher_is_better)
    skipped_steps: int = 0
    timed_steps: int = 0  # steps in the throughput averages: all but the first of each session (warm-up, compile)
    timed_seconds: float = 0.0
    timed_sampling_seconds: float = 0.0  # of timed_seconds: the model writing its own data (SAMPLING_SECONDS)
    total_time_s: float = 0.0  # wall-clock time inside the loop, summed over sessions
    tokens_seen: int = 0  # summed step by step: a resumed run may have another total_batch_size
    timed_tokens: int = 0  # the tokens of the timed steps

    def fold_loss(self, loss: float) -> None:
        if math.isfinite(loss):  # one overflowed step would leave the smoothed loss NaN for good
            self.loss_ema = LOSS_EMA_BETA * self.loss_ema + (1 - LOSS_EMA_BETA) * loss
            self.loss_ema_steps += 1

    def smoothed_loss(self) -> float:
        if not self.loss_ema_steps:
            return math.nan
        return self.loss_ema / (1 - LOSS_EMA_BETA ** self.loss_ema_steps)  # bias correction: the EMA starts at 0


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"  # what torch's CPU allocator raises, as text


def halved_batch_size(batch_size: int) -> int:
    """The largest divisor of batch_size up to half of it: the accumulation count stays a whole number."""
    return next(size for size in range(batch_size // 2, 0, -1) if batch_size % size == 0)


def learning_rates(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """This step's learning rates, read by build_optimizers' layout: [AdamW(embedding, unembedding), Muon]."""
    adamw, muon = optimizers
    return {"train/lr_matrix": muon.param_groups[0]["lr"], "train/lr_embedding": adamw.param_groups[0]["lr"],
            "train/lr_unembedding": adamw.param_groups[1]["lr"]}


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f}m"


# ---------------------------------------------------------------------- distributed set-up


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def training_device(config: RunConfig, local_rank: int = 0) -> torch.device:
    # CPUs run ~10x slower on denormal floats, which near-zero gradients and optimizer states are full of;
    # flushing them to zero costs no accuracy that matters (GPUs flush them already)
    torch.set_flush_denormal(True)
    device = select_device(config.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():  # torch's "invalid device ordinal" traceback, on that rank
            raise ConfigError("device", f"torchrun started process {local_rank} of a node with "
                                        f"{torch.cuda.device_count()} CUDA device(s): at most one process per device")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def load_optimizer_states(optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    """The saved states' moments into `optimizers`, which keep their own settings (learning rates, momentum,
    weight decay, fused): the run's config wins over the one that saved them. The settings go in before the moments,
    because torch places each AdamW `step` by them: a state saved on a CPU (not fused) would leave its steps on the
    CPU, where a GPU's fused AdamW cannot use them."""
    for optimizer, state in zip(optimizers, states, strict=True):
        groups = [{**saved, **{key: value for key, value in group.items() if key != "params"}}
                  for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True)]
        optimizer.load_state_dict({**state, "param_groups": groups})


# ---------------------------------------------------------------------- phases


class Phase:
    """What a training phase brings to the loop. Subclasses: Pretraining (pretrain.py), FineTuning (sft.py) and
    ReinforcementLearning (rl.py)."""

    model_kind: str  # "base" or "chat": the kind of model it makes, saved as the checkpoint's "phase", so the chat
    #                  tools know whether it holds conversations
    stage: str  # "base", "chat" (SFT) or "rl": which stage trained it; names the W&B run within an execution
    metric: str  # the validation metric: "bpb", "loss" or "pass@1" (logged as val/<metric>)
    higher_is_better = False  # summarised as min_validation_<metric>, or as max_validation_<metric>
    muon_momentum_warmup = True  # Muon's momentum rises from 0.85 to 0.95 over the first steps, else is 0.95
    tokenizer: tiktoken.Encoding
    tokenizer_dir: Path  # copied into the checkpoint: a checkpoint carries its tokenizer

    def batches(self, batch_size: int, device: torch.device, rank: int, world_size: int, state: dict | None):
        """An iterator of the micro-batches loss() takes ((inputs, targets); RL adds advantages), with state_dict(),
        close() and .epoch, resumed at state."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batch_size: int, device: torch.device, precision: Precision) -> float:
        """The validation metric (higher_is_better says which way is better). Under DDP every rank calls it and gets
        the same number."""
        raise NotImplementedError

    def samples(self, model: GPT, precision: Precision) -> list[dict[str, str]]:
        """[{"prompt", "completion"}] to log: what the model writes at this point of training."""
        raise NotImplementedError

    def load_start(self, model: GPT, optimizers: list[torch.optim.Optimizer]) -> None:
        """Starting weights on top of the fresh initialisation, and optimizer states under this run's settings
        (the chat stages load their start checkpoint's weights, SFT its moments too)."""

    def attach(self, model: GPT, precision: Precision) -> None:
        """The model being trained, with its weights loaded or resumed (RL samples its rollouts from it)."""

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        """A micro-batch's loss: next-token cross-entropy unless the phase trains otherwise."""
        return next_token_loss(model, batch)

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the step just taken besides the loss (RL's mean reward); every rank calls it."""
        return {}

    def periodic_metrics(self, model: GPT, step: int, batch_size: int, precision: Precision) -> dict[str, float]:
        """Extra evaluations at some step boundaries (CORE during pretraining); every rank calls it."""
        return {}

    def info(self) -> dict:
        """Facts about the phase's inputs for run_info.json and W&B (data, base checkpoint, ...)."""
        return {}


# ---------------------------------------------------------------------- the loop


class Trainer:
    """Trains `phase` under `config` into the checkpoint directory out_dir; `run()` returns the summary.

    resume_dir: a checkpoint directory to continue from (its step, optimizers, data position, RNG states).
    on_save(out_dir): called after every save on rank 0 (the workflow uploads Flyte's intra-task checkpoint).
    """

    def __init__(self, config: RunConfig, phase: Phase, out_dir: Path, *, resume_dir: Path | None = None,
                 on_save: Callable[[Path], None] | None = None, env_report: dict | None = None):
        self.phase, self.out_dir, self.on_save, self.env_report = phase, Path(out_dir), on_save, env_report
        check_out_dir(self.out_dir, resume_dir)
        local_rank = self.join_ranks(config)
        self.build_model(config)
        # a checkpoint of this stage to continue, whose run's copies save_to may hold
        resumed_run = check_resumed_stage(resume_dir, phase.stage)["run_name"] if resume_dir is not None else ""
        self.make_out_dir(config, resumed_run)
        self.resumed = resume_dir is not None
        self.start_step, loader_state = 0, None
        self.resumed_finished = False  # resumed from the last step of its num_iterations (set by resume)
        self.resumed_done = (False, False)  # whether that run evaluated and sampled at the saved step (set by resume)
        if resume_dir is not None:
            config, loader_state = self.resume(config, Path(resume_dir))
        self.config = config = config.resolved()
        self.saved_step = self.start_step if self.resumed else None  # the step of the newest checkpoint in out_dir
        phase.attach(self.model, self.precision)
        self.loader = phase.batches(self.loop.device_batch_size, self.device, self.rank, self.world_size, loader_state)
        self.wrap_model(local_rank)
        self.describe_run()
        self.tracker = Tracker(config, self.out_dir, env_report, rank=self.rank,
                               resume_step=self.start_step if self.resumed else None, phase=phase.stage)
        self.tracker.log_config(self.facts)

    def join_ranks(self, config: RunConfig) -> int:
        """This process's rank, device and precision; the process group under torchrun. Returns the local rank."""
        self.rank, local_rank, self.world_size = distributed_env()
        config.validate(self.world_size)
        self.device = training_device(config, local_rank)
        self.own_process_group = self.world_size > 1 and not dist.is_initialized()
        if self.own_process_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.world_size > 1:  # every rank has checked out_dir (check_out_dir) before rank 0 writes into it
            dist.barrier()
        self.master = self.rank == 0
        self.precision = select_precision(self.device, config.dtype)
        return local_rank

    def build_model(self, config: RunConfig) -> None:
        """The model with the phase's starting weights, its optimizers, the fp16 grad scaler and a fresh loop state."""
        self.model = build_model(config, self.phase.tokenizer.n_vocab, self.device)
        self.optimizers = build_optimizers(self.model, config)
        self.phase.load_start(self.model, self.optimizers)
        self.grad_scaler = make_grad_scaler(self.precision, self.device)
        self.loop = LoopState(device_batch_size=config.device_batch_size)

    def make_out_dir(self, config: RunConfig, resumed_run: str) -> None:
        """out_dir and the save_to copy are checked writable before any training. save_to may hold the copies of the
        run resumed (resumed_run), or of this run (an attempt retried without a copy to resume): the callers' checks,
        before any download, refuse any other run's there, whatever the new run is named."""
        check_save_to(config.save_to, STAGE_CONFIGS[self.phase.stage], continues=resumed_run or config.run_name)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError("out_dir", f"cannot create {str(self.out_dir)!r}: {error.strerror}", "Trainer") from None

    def resume(self, config: RunConfig, resume_dir: Path) -> tuple[RunConfig, dict]:
        """Load the weights, optimizers, scaler, loop state and RNG states saved in resume_dir. Returns the config
        (with the resumed run's name where it had none) and the data loader's saved position. (Its stage was checked
        by __init__.)"""
        check_same_model(resume_dir, self.model.config.to_dict(), self.phase.tokenizer, self.phase.tokenizer_dir)
        checkpoint = load_checkpoint(resume_dir)
        check_not_past(config.num_iterations, checkpoint["step"], resume_dir, STAGE_CONFIGS[self.phase.stage])
        self.model.load_state_dict(checkpoint["model"])
        load_optimizer_states(self.optimizers, checkpoint["optimizers"])
        if self.grad_scaler and checkpoint["grad_scaler"]:  # (none in a bf16 or fp32 run's: a fresh scale)
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        loop = dict(checkpoint["loop"])
        if "min_val_metric" in loop:  # its name in checkpoints saved before RL's higher-is-better metric
            loop["best_val_metric"] = loop.pop("min_val_metric")
        loop.setdefault("loss_ema_steps", checkpoint["step"])  # saved before it was counted: every step was folded
        saved_batch = checkpoint["config"]["total_batch_size"]  # saved before tokens were counted: at the saved batch
        loop.setdefault("tokens_seen", checkpoint["step"] * saved_batch)
        loop.setdefault("timed_tokens", loop.get("timed_steps", 0) * saved_batch)
        if config.device_batch_size != checkpoint["config"]["device_batch_size"]:
            loop["device_batch_size"] = config.device_batch_size  # asked for anew; else the saved one (OOM-halved)
        self.loop = LoopState(**loop)
        self.start_step = checkpoint["step"]
        saved = checkpoint["config"]
        self.resumed_finished = self.start_step == saved["num_iterations"]
        # by its own schedule, which this run may have changed
        self.resumed_done = (self.start_step % saved["eval_every"] == 0, self.start_step % saved["sample_every"] == 0)
        restore_rng_states(checkpoint["rng"])
        if not config.run_name:  # keep the name (and with it the W&B run) of the run being resumed
            config = dataclasses.replace(config, run_name=checkpoint["config"]["run_name"])
        if self.master and resume_dir.resolve() != self.out_dir.resolve():
            # continue in out_dir from the saved directory: metrics, samples and the W&B run id come along; not
            # the results of the run that saved it (a save_to copy has them), which are not this run's
            shutil.copytree(resume_dir, self.out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(RESULTS_FILE))
        return config, checkpoint["loader"]

    def wrap_model(self, local_rank: int) -> None:
        """torch.compile where it applies, then DDP over the ranks: `trained` is what the steps run."""
        self.compiled = compile_model(self.model, self.config, self.device)
        self.trained = self.compiled
        if self.world_size > 1:
            # The model's only buffers, the rotary tables, are computed alike on every rank: nothing to broadcast
            # before each forward (torch 2.13 renamed the switch and warns at the old name)
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_PARAMETERS
                              else {"broadcast_buffers": False})
            self.trained = DistributedDataParallel(self.compiled, **no_buffer_sync,
                                                   device_ids=[local_rank] if self.device.type == "cuda" else None)

    def describe_run(self) -> None:
        """The run's facts (for W&B and the report card); on rank 0, the tokenizer and config.json in out_dir (what a
        run that resumes this one reads) and one line on the model and the machine."""
        config, phase, model = self.config, self.phase, self.model
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        self.peak = peak_flops(self.device_name, self.precision.dtype)
        self.facts = {"phase": phase.model_kind, "num_params": model.num_params(),
                      "flops_per_token": model.estimate_flops(),
                      "device": self.device.type, "device_name": self.device_name, "dtype": self.precision.name,
                      "world_size": self.world_size, "model_config": model.config.to_dict(), **phase.info()}
        if self.master:
            shutil.copytree(phase.tokenizer_dir, self.out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
            write_json(self.out_dir / CONFIG_FILE, config.to_dict())
            print(f"model: depth {config.depth}, {self.facts['num_params']:,} parameters, "
                  f"{self.facts['flops_per_token']:.3e} FLOPs/token | device: {self.device_name} "
                  f"({self.precision.name}), world size {self.world_size} | phase: {phase.model_kind}", flush=True)

    # ------------------------------------------------------------------ numbers

    def grad_accum_steps(self) -> int:
        return dataclasses.replace(self.config, device_batch_size=self.loop.device_batch_size
                                   ).grad_accum_steps(self.world_size)

    def mfu_percent(self, tok_per_sec: float) -> float | None:
        utilisation = mfu(self.facts["flops_per_token"], tok_per_sec / self.world_size, self.peak)  # one device's
        return None if utilisation is None else 100 * utilisation

    def summary(self, status: str, step: int) -> dict:
        config, loop, metric = self.config, self.loop, self.phase.metric
        training_seconds = loop.timed_seconds - loop.timed_sampling_seconds
        tok_per_sec = loop.timed_tokens / training_seconds if loop.timed_steps else None
        best = "max" if self.phase.higher_is_better else "min"
        return {"status": status, "phase": self.phase.model_kind, "stage": self.phase.stage,
                "run_name": config.run_name,
                "depth": config.depth, "num_iterations": config.num_iterations, "steps_completed": step,
                f"{best}_validation_{metric}": loop.best_val_metric, f"final_validation_{metric}": loop.val_metric,
                "tokens_seen": loop.tokens_seen, "total_time_s": loop.total_time_s,
                "avg_tok_per_sec": tok_per_sec, "avg_mfu": self.mfu_percent(tok_per_sec) if tok_per_sec else None,
                **{key: self.facts[key] for key in ("num_params", "flops_per_token", "device", "device_name", "dtype")},
                "skipped_steps": loop.skipped_steps, "device_batch_size": loop.device_batch_size,
                "grad_accum_steps": self.grad_accum_steps(), "data_epochs": self.loader.epoch,
                "wandb_url": self.tracker.url, "wandb_mode": self.tracker.mode}

    # ------------------------------------------------------------------ step-boundary work

    def save(self, step: int, status: str) -> None:
        save_checkpoint(self.out_dir, step=step, model=self.model, optimizers=self.optimizers,
                        grad_scaler=self.grad_scaler, loader_state=self.loader.state_dict(),
                        loop_state=dataclasses.asdict(self.loop), config=self.config.to_dict(),
                        model_config=self.model.config)
        write_json(self.out_dir / TRAINING_STATE_FILE, self.summary(status, step))
        self.saved_step = step
        print(f"step {step:05d} | saved checkpoint to {self.out_dir}", flush=True)
        if self.config.save_to:
            publish_checkpoint(self.out_dir, self.config.save_to)
            print(f"step {step:05d} | copied the checkpoint to {self.config.save_to}", flush=True)
        if self.on_save:
            self.on_save(self.out_dir)

    def evaluate(self, step: int) -> None:
        loop, metric = self.loop, self.phase.metric
        # every rank evaluates its share of the validation set
        loop.val_metric = self.phase.evaluate(self.compiled, loop.device_batch_size, self.device, self.precision)
        better = max if self.phase.higher_is_better else min
        if math.isfinite(loop.val_metric):  # a diverged run's NaN is no best (and min(nan, 2.0) would be nan)
            loop.best_val_metric = loop.val_metric if loop.best_val_metric is None else better(loop.val_metric,
                                                                                              loop.best_val_metric)
        self.tracker.log(step, {f"val/{metric}": loop.val_metric})
        if self.master:
            best = "n/a" if loop.best_val_metric is None else f"{loop.best_val_metric:.4f}"  # (only NaN so far)
            print(f"step {step:05d} | validation {metric}: {loop.val_metric:.4f} (best {best})", flush=True)

    def periodic(self, step: int) -> None:
        metrics = self.phase.periodic_metrics(self.model, step, self.loop.device_batch_size, self.precision)
        if metrics:
            self.tracker.log(step, metrics)
            if self.master:
                print(f"step {step:05d} | " + " | ".join(f"{key}: {value:.4f}" for key, value in metrics.items()
                                                        if "/" not in key), flush=True)

    def sample(self, step: int) -> None:
        samples = self.phase.samples(self.model, self.precision)
        for sample in samples:
            # repr escapes the controls; shown() the invisible characters repr leaves as they are
            print(f"step {step:05d} | sample: {shown(repr(sample['prompt']))} -> {shown(repr(sample['completion']))}",
                  flush=True)
        self.tracker.log_samples(step, samples)

    # ------------------------------------------------------------------ one optimizer step

    def optimizer_step(self, step: int) -> tuple[StepResult, float]:
        """One optimizer step from `step`, re-run with a smaller device batch after a CUDA out-of-memory error.
        Returns its result and its wall time in seconds: until apply_gradients has read the loss. No synchronisation
        around it: the GPU works on the step's last kernels (the optimizers', with fp16) while the host logs and
        starts the next step, whose time then includes them; over the steps the times add up to the GPU's."""
        config = self.config
        # as compile_model compiled the model (only on CUDA)
        cuda_graphs = replays_cuda_graphs(config.compile, config.compile_mode, self.device)
        apply_schedules(self.optimizers, step, config, self.phase.muon_momentum_warmup)
        loader_at_step_start = self.loader.state_dict()
        start = time.perf_counter()
        while True:  # only the forward and backward passes are re-run: no optimizer has seen this step yet
            try:
                loss = accumulate_gradients(self.trained, self.loader, self.grad_accum_steps(), self.precision,
                                            self.grad_scaler, self.phase.loss, cuda_graphs)
                break
            except torch.cuda.OutOfMemoryError as error:
                self.halve_device_batch(step, error, loader_at_step_start)
            except RuntimeError as error:  # a laptop's memory: the CPU allocator's failure is no OutOfMemoryError
                if CPU_OUT_OF_MEMORY not in str(error):
                    raise
                self.halve_device_batch(step, error, loader_at_step_start)
        try:
            result = apply_gradients(self.trained, self.optimizers, loss, self.grad_scaler, config.grad_clip,
                                     cuda_graphs)
        except torch.cuda.OutOfMemoryError as error:  # the optimizers' state, allocated at their first step
            raise ConfigError("depth", f"CUDA out of memory in the optimizer step (depth {config.depth}): the "
                                       f"weights, gradients and optimizer state do not fit on {self.device_name}, "
                                       "whatever the device batch; lower depth") from error
        return result, time.perf_counter() - start

    def halve_device_batch(self, step: int, error: RuntimeError, loader_at_step_start: dict) -> None:
        """After an out-of-memory error (CUDA's, or the CPU allocator's) in the forward or backward pass: the step is
        re-run from its start with half the device batch (and twice the accumulation steps), or the run stops in one
        line when it cannot be."""
        config, loop = self.config, self.loop
        memory = "CPU" if CPU_OUT_OF_MEMORY in str(error) else "CUDA"
        if self.world_size > 1:  # the ranks would have to agree on the new batch; they cannot, mid-step
            raise ConfigError("device_batch_size", f"{memory} out of memory on rank {self.rank} at "
                                                   f"{loop.device_batch_size}: under DDP, lower it (the automatic "
                                                   "fallback works in single-process runs)",
                              STAGE_CONFIGS[self.phase.stage]) from error
        if loop.device_batch_size == 1:
            raise ConfigError("depth", f"{memory} out of memory at device_batch_size 1 (depth {config.depth}, "
                                       f"max_seq_len {config.max_seq_len}): the model does not fit on "
                                       f"{self.device_name}; lower depth or max_seq_len") from error
        self.model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        loop.device_batch_size = halved_batch_size(loop.device_batch_size)
        print(f"step {step + 1:05d} | {memory} out of memory: retrying with device_batch_size "
              f"{loop.device_batch_size}, {self.grad_accum_steps()} accumulation steps", flush=True)
        self.loader.close()
        self.loader = self.phase.batches(loop.device_batch_size, self.device, self.rank, self.world_size,
                                         loader_at_step_start)

    def log_step(self, step: int, result: StepResult, dt: float, phase_metrics: dict[str, float]) -> None:
        """Metrics of the step that just finished (step counts finished steps) to W&B, metrics.jsonl and stdout."""
        config, loop = self.config, self.loop
        tok_per_sec = config.total_batch_size / (dt - phase_metrics.get(SAMPLING_SECONDS, 0.0))
        step_mfu = self.mfu_percent(tok_per_sec)
        lrm = lr_multiplier(step - 1, config)
        smoothed = loop.smoothed_loss()
        shown_loss = smoothed if math.isfinite(result.loss) else result.loss  # an inf/NaN step says so
        metrics = {"train/loss": result.loss, "train/loss_smooth": smoothed, "train/lrm": lrm,
                   **learning_rates(self.optimizers), "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                   "train/mfu": step_mfu, "train/grad_norm": result.grad_norm,
                   "train/skipped_steps": loop.skipped_steps, **phase_metrics}
        if self.device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if result.grad_scale is not None:
            metrics["train/grad_scale"] = result.grad_scale
        self.tracker.log(step, metrics)
        mean_dt = loop.timed_seconds / loop.timed_steps if loop.timed_steps else dt
        eta = (config.num_iterations - step) * mean_dt
        print(f"step {step:05d}/{config.num_iterations:05d} ({100 * step / config.num_iterations:.2f}%) | "
              f"loss: {shown_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | "
              f"mfu: {'n/a' if step_mfu is None else f'{step_mfu:.2f}'} | "
              f"total time: {format_minutes(loop.total_time_s)} | eta: {eta / 60:.1f}m"
              + "".join(f" | {key.split('/')[-1]}: {value:.4f}" for key, value in phase_metrics.items())
              + (" | skipped (fp16 overflow)" if result.skipped else ""), flush=True)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        try:
            step = self.train_until_done()
            return self.finish(step)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C (flytekit turns SIGINT into SystemExit in local runs)
            if self.master:
                print(self.interrupted_message(), flush=True)
            raise
        finally:
            self.loader.close()
            if self.own_process_group:
                dist.destroy_process_group()

    def train_until_done(self) -> int:
        config, loop = self.config, self.loop
        nonfinite_since = None  # the first step of the current run of inf/NaN losses
        step = self.step = self.start_step
        session_start, session_steps = time.perf_counter(), 0
        time_before_session = loop.total_time_s
        while True:
            last_step = step == config.num_iterations
            evaluate, sample, periodic, save = self.due_at(step, last_step)
            if evaluate:
                self.evaluate(step)
            if periodic:
                self.periodic(step)
            if self.master and sample:
                self.sample(step)
            if save and nonfinite_since is None:  # never over the last save with NaN weights
                self.stop_if_weights_diverged(step)  # (a NaN gradient after a finite loss)
                if self.master:
                    self.save(step, "running")
            if last_step:
                loop.total_time_s = time_before_session + time.perf_counter() - session_start  # (its evaluation's)
                break
            result, dt = self.optimizer_step(step)
            phase_metrics = self.phase.step_metrics()
            step = self.step = step + 1
            session_steps += 1
            # the first step pays for warm-up and compilation
            self.count_step(result, dt, phase_metrics.get(SAMPLING_SECONDS, 0.0), timed=session_steps > 1)
            loop.total_time_s = time_before_session + time.perf_counter() - session_start
            if math.isfinite(result.loss):
                nonfinite_since = None
            elif nonfinite_since is None:
                nonfinite_since = step
            if self.master:
                self.log_step(step, result, dt, phase_metrics)
            if nonfinite_since is not None and step - nonfinite_since + 1 >= DIVERGED_AFTER_STEPS:
                raise TrainingDiverged(self.diverged_message(
                    f"the loss has been {result.loss} since step {nonfinite_since} "
                    f"({step - nonfinite_since + 1} steps in a row)", nonfinite_since))
        return step

    def due_at(self, step: int, last_step: bool) -> tuple[bool, bool, bool, bool]:
        """What runs at `step` before its optimizer step: (evaluate, sample, periodic metrics, save)."""
        config = self.config
        if self.resumed and step == self.start_step:
            # The checkpoint was saved after this step's evaluation and samples as they were due then. A run
            # resumed to end here, at a save of a run that went on, still owes the last step's.
            owed = last_step and not self.resumed_finished
            evaluated, sampled = self.resumed_done
            return owed and not evaluated, owed and not sampled, False, False
        evaluate = last_step or step % config.eval_every == 0
        sample = last_step or (step > 0 and step % config.sample_every == 0)
        return evaluate, sample, True, not last_step and step > 0 and step % config.save_every == 0

    def count_step(self, result: StepResult, dt: float, sampling_seconds: float, timed: bool) -> None:
        """A finished step's tokens, time (timed: it counts towards tok/s and the ETA; sampling_seconds of it only
        towards the ETA), skip and loss."""
        config, loop = self.config, self.loop
        loop.tokens_seen += config.total_batch_size
        if timed:
            loop.timed_steps += 1
            loop.timed_seconds += dt
            loop.timed_sampling_seconds += sampling_seconds
            loop.timed_tokens += config.total_batch_size
        loop.skipped_steps += result.skipped
        loop.fold_loss(result.loss)

    def stop_if_weights_diverged(self, step: int) -> None:
        """Before a save: weights that hold inf/NaN end the run here (every rank holds the same), never over the last
        good checkpoint. A loss that went NaN in the last steps, too few to stop the run, leaves them so in bf16 or
        fp32; a NaN gradient after a finite loss too."""
        if not torch.stack([parameter.isfinite().all() for parameter in self.model.parameters()]).all():
            raise TrainingDiverged(self.diverged_message(f"the weights hold inf/NaN at step {step}", step))

    def finish(self, step: int) -> dict:
        self.stop_if_weights_diverged(step)
        result = self.summary("completed", step)
        if self.master:
            self.save(step, "completed")
            self.tracker.set_summary(result)
            result["wandb_url"] = self.tracker.finish()
            write_json(self.out_dir / TRAINING_STATE_FILE, result)
            write_report(self.out_dir, self.config, self.env_report, result)
            if self.config.save_to:  # the closed W&B run, the final state and the report, beside the weights
                publish_checkpoint(self.out_dir, self.config.save_to, weights=False)
        return result

    def diverged_message(self, what: str, first: int) -> str:
        """what went wrong since step `first`. Step k's loss comes from the weights of step k - 1: a checkpoint of an
        earlier step holds weights from before the divergence (later ones may hold NaN)."""
        where = self.config.save_to or self.out_dir
        if self.saved_step is not None and self.saved_step < first:
            kept = f"its last checkpoint before that (step {self.saved_step}) is in {where}"
        else:
            kept = "no checkpoint from before that was saved"
        return (f"training diverged: {what}; {kept}. Lower the learning rates (embedding_lr, unembedding_lr, "
                "matrix_lr) or raise warmup_ratio, and train again")

    def interrupted_message(self) -> str:
        where = self.config.save_to or self.out_dir
        if self.saved_step is None:
            return (f"interrupted at step {self.step}, before the first checkpoint (saved every "
                    f"{self.config.save_every} steps): nothing to resume from")
        return f"interrupted at step {self.step}; the last checkpoint (step {self.saved_step}) is in {where}"
