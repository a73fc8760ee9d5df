"""The base-model training loop: `train()`, and `python -m nanochat_flyte.train` (also under torchrun).

One loop for every setting: CPU, MPS, one GPU, or N GPUs under DDP (rank 0 alone writes and logs). Per step:
grad_accum_steps micro-batches forward/backward, one optimizer step. At step boundaries: validation bpb,
samples and checkpoints. In a single-process run a CUDA out-of-memory error halves the device batch (and
doubles the accumulation, so the optimizer sees the same batch) and re-runs the step.

    python -m nanochat_flyte.train --config configs/X.yaml --data-dir DATA --out-dir OUT [--resume-dir CKPT]
    torchrun --nproc_per_node=2 -m nanochat_flyte.train --config configs/X.yaml --data-dir DATA --out-dir OUT
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanochat_flyte.checkpoint import (TRAINING_STATE_FILE, copy_tokenizer, load_checkpoint, restore_rng_states,
                                       save_checkpoint, write_json)
from nanochat_flyte.config import RunConfig, load_config
from nanochat_flyte.dataloader import TokenLoader, shard_files, validation_tokens
from nanochat_flyte.device import Precision, mfu, peak_flops, select_device, select_precision
from nanochat_flyte.environment import environment_report
from nanochat_flyte.evaluate import evaluate_bpb
from nanochat_flyte.model import GPT, GPTConfig
from nanochat_flyte.optim import apply_schedules, build_optimizers, lr_multiplier
from nanochat_flyte.report import write_report
from nanochat_flyte.sample import complete
from nanochat_flyte.tokenizer import load_tokenizer, token_byte_lengths
from nanochat_flyte.tracking import Tracker

SAMPLE_PROMPTS = (
    "The capital of France is",
    "If yesterday was Friday, then tomorrow will be",
    "The chemical symbol of gold is",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)
LOSS_EMA_BETA = 0.9  # smoothing of the logged loss: roughly the mean of the last 10 steps


# ---------------------------------------------------------------------- one optimizer step


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping; inf/nan on an fp16 overflow
    skipped: bool  # the grad scaler found inf/nan gradients and no optimizer stepped


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterator,
               grad_accum_steps: int, precision: Precision, grad_scaler: torch.amp.GradScaler | None,
               grad_clip: float) -> StepResult:
    """Forward/backward over grad_accum_steps micro-batches, then one step of every optimizer."""
    micro_losses = []
    for micro_step in range(grad_accum_steps):
        inputs, targets = next(batches)
        # under DDP, all-reduce the gradients once, after the last micro-batch
        last_micro_step = micro_step == grad_accum_steps - 1
        no_sync = isinstance(model, DistributedDataParallel) and not last_micro_step
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with precision.autocast():
                loss = model(inputs, targets)
            micro_losses.append(loss.detach())
            loss = loss / grad_accum_steps  # the gradient of the mean over the whole batch
            (grad_scaler.scale(loss) if grad_scaler else loss).backward()
    if grad_scaler:
        for optimizer in optimizers:  # clip (and step) the true gradients, not the scaled ones
            grad_scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # skip the whole step on inf/nan, not only the optimizers whose own gradients overflowed
    skipped = grad_scaler is not None and not torch.isfinite(grad_norm).item()
    for optimizer in optimizers:
        if grad_scaler is None:
            optimizer.step()
        elif not skipped:
            grad_scaler.step(optimizer)
    if grad_scaler:
        grad_scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
    model.zero_grad(set_to_none=True)
    loss = torch.stack(micro_losses).mean()
    if dist.is_initialized():
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        loss /= dist.get_world_size()
    return StepResult(loss=loss.item(), grad_norm=grad_norm.item(), skipped=skipped)


def build_model(config: RunConfig, vocab_size: int, device: torch.device) -> GPT:
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run of a config
    model = GPT(GPTConfig.from_depth(config.depth, vocab_size, config.max_seq_len)).to(device)
    model.init_weights()
    return model


def compile_model(model: GPT, config: RunConfig, device: torch.device) -> torch.nn.Module:
    # compile pays off only on CUDA; on CPU its start-up time exceeds any gain in a run that fits a CPU
    return torch.compile(model) if config.compile and device.type == "cuda" else model


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None


# ---------------------------------------------------------------------- loop state


@dataclass
class LoopState:
    """Everything the loop carries from step to step besides weights, optimizers and data: saved in checkpoints."""

    device_batch_size: int  # can shrink after an out-of-memory error
    loss_ema: float = 0.0
    val_bpb: float | None = None  # last evaluation
    min_val_bpb: float | None = None
    skipped_steps: int = 0
    timed_steps: int = 0  # steps in the throughput averages: all but the first of each session (warm-up, compile)
    timed_seconds: float = 0.0
    total_time_s: float = 0.0  # wall-clock time inside the loop, summed over sessions

    def smoothed_loss(self, steps: int) -> float:
        return self.loss_ema / (1 - LOSS_EMA_BETA ** steps)  # bias correction: the EMA starts at 0


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
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------- the loop


def generate_samples(model: GPT, tokenizer, config: RunConfig, precision: Precision) -> list[dict[str, str]]:
    return [{"prompt": prompt,
             "completion": complete(model, tokenizer, prompt, max_tokens=config.sample_max_tokens,
                                    temperature=config.sample_temperature, top_k=config.sample_top_k or None,
                                    seed=config.seed, precision=precision)}
            for prompt in SAMPLE_PROMPTS]


def train(config: RunConfig, data_dir: Path, out_dir: Path, *, resume_dir: Path | None = None,
          on_save: Callable[[Path], None] | None = None, env_report: dict | None = None) -> dict:
    """Train a base model on data_dir's tokens; write the checkpoint directory to out_dir; return the summary."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rank, local_rank, world_size = distributed_env()
    config.validate(world_size)
    device = training_device(config, local_rank)
    own_process_group = world_size > 1 and not dist.is_initialized()
    if own_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    precision = select_precision(device, config.dtype)

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    model = build_model(config, tokenizer.n_vocab, device)
    optimizers = build_optimizers(model, config)
    grad_scaler = make_grad_scaler(precision, device)
    loop = LoopState(device_batch_size=config.device_batch_size)
    start_step, loader_state = 0, None
    if resume_dir is not None:
        checkpoint = load_checkpoint(Path(resume_dir))
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        if grad_scaler:
            grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        loop = LoopState(**checkpoint["loop"])
        start_step, loader_state = checkpoint["step"], checkpoint["loader"]
        restore_rng_states(checkpoint["rng"])
        if not config.run_name:  # keep the name (and with it the W&B run) of the run being resumed
            config = dataclasses.replace(config, run_name=checkpoint["config"]["run_name"])
        if master and Path(resume_dir).resolve() != out_dir.resolve():
            # continue in out_dir from the saved directory: metrics, samples and the W&B run id come along
            shutil.copytree(resume_dir, out_dir, dirs_exist_ok=True)
        del checkpoint
    config = config.resolved()

    def make_loader(batch_size: int, state: dict | None) -> TokenLoader:
        loader = TokenLoader(shard_files(data_dir, "train"), batch_size, config.max_seq_len, seed=config.seed,
                             device=device, rank=rank, world_size=world_size)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    loader = make_loader(loop.device_batch_size, loader_state)
    compiled = compile_model(model, config, device)
    trained = compiled
    if world_size > 1:
        trained = DistributedDataParallel(compiled, device_ids=[local_rank] if device.type == "cuda" else None)
    val_tokens = validation_tokens(data_dir, config.eval_tokens)
    token_bytes = token_byte_lengths(tokenizer)

    flops_per_token = model.estimate_flops()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = peak_flops(device_name, precision.dtype)
    facts = {"num_params": model.num_params(), "flops_per_token": flops_per_token, "device": device.type,
             "device_name": device_name, "dtype": precision.name, "world_size": world_size,
             "model_config": model.config.to_dict()}
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(data_dir, out_dir)
        print(f"model: depth {config.depth}, {facts['num_params']:,} parameters, {flops_per_token:.3e} FLOPs/token | "
              f"device: {device_name} ({precision.name}), world size {world_size}", flush=True)
    tracker = Tracker(config, out_dir, env_report, rank=rank, resume_step=start_step if resume_dir else None)
    tracker.log_config(facts)

    def summary(status: str, step: int) -> dict:
        tok_per_sec = loop.timed_steps * config.total_batch_size / loop.timed_seconds if loop.timed_steps else None
        return {"status": status, "run_name": config.run_name, "depth": config.depth,
                "num_iterations": config.num_iterations, "steps_completed": step,
                "min_validation_bpb": loop.min_val_bpb, "final_validation_bpb": loop.val_bpb,
                "tokens_seen": step * config.total_batch_size, "total_time_s": loop.total_time_s,
                "avg_tok_per_sec": tok_per_sec,
                "avg_mfu": mfu_percent(tok_per_sec) if tok_per_sec else None,
                **{key: facts[key] for key in ("num_params", "flops_per_token", "device", "device_name", "dtype")},
                "skipped_steps": loop.skipped_steps, "device_batch_size": loop.device_batch_size,
                "grad_accum_steps": grad_accum_steps(), "data_epochs": loader.epoch, "wandb_url": tracker.url}

    def mfu_percent(tok_per_sec: float) -> float | None:
        utilisation = mfu(flops_per_token, tok_per_sec / world_size, peak)  # mfu() takes one device's rate
        return None if utilisation is None else 100 * utilisation

    def grad_accum_steps() -> int:
        return dataclasses.replace(config, device_batch_size=loop.device_batch_size).grad_accum_steps(world_size)

    def save(step: int, status: str) -> None:
        save_checkpoint(out_dir, step=step, model=model, optimizers=optimizers, grad_scaler=grad_scaler,
                        loader_state=loader.state_dict(), loop_state=dataclasses.asdict(loop),
                        config=config.to_dict(), model_config=model.config)
        write_json(out_dir / TRAINING_STATE_FILE, summary(status, step))
        print(f"step {step:05d} | saved checkpoint to {out_dir}", flush=True)

    step = start_step
    session_start, session_steps = time.perf_counter(), 0
    time_before_session = loop.total_time_s
    while True:
        last_step = step == config.num_iterations
        # a resumed run starts where its checkpoint was saved: that step's eval, samples and save are done
        done_before_resume = resume_dir is not None and step == start_step
        if not done_before_resume and (last_step or step % config.eval_every == 0):
            # every rank evaluates its share of the validation slice
            loop.val_bpb = evaluate_bpb(compiled, val_tokens, token_bytes, batch_size=loop.device_batch_size,
                                        seq_len=config.max_seq_len, eval_tokens=config.eval_tokens,
                                        device=device, precision=precision)
            loop.min_val_bpb = min(loop.val_bpb, loop.min_val_bpb or math.inf)
            tracker.log(step, {"val/bpb": loop.val_bpb})
            if master:
                print(f"step {step:05d} | validation bpb: {loop.val_bpb:.4f} (min {loop.min_val_bpb:.4f})", flush=True)
        if master and not done_before_resume:
            if last_step or (step > 0 and step % config.sample_every == 0):
                samples = generate_samples(model, tokenizer, config, precision)
                for sample in samples:
                    print(f"step {step:05d} | sample: {sample['prompt']!r} -> {sample['completion']!r}", flush=True)
                tracker.log_samples(step, samples)
            if not last_step and step > 0 and step % config.save_every == 0:
                save(step, "running")
                if on_save:
                    on_save(out_dir)
        if last_step:
            break

        # one optimizer step, re-run with a smaller device batch after a CUDA out-of-memory error
        apply_schedules(optimizers, step, config)
        loader_at_step_start = loader.state_dict()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_start = time.perf_counter()
        while True:
            try:
                result = train_step(trained, optimizers, loader, grad_accum_steps(), precision, grad_scaler,
                                    config.grad_clip)
                break
            except torch.cuda.OutOfMemoryError as error:
                if world_size > 1:  # the ranks would have to agree on the new batch; they cannot, mid-step
                    raise RuntimeError(f"CUDA out of memory on rank {rank} at device_batch_size "
                                       f"{loop.device_batch_size}: under DDP, lower device_batch_size (the "
                                       "automatic fallback works in single-process runs)") from error
                if loop.device_batch_size == 1:
                    raise RuntimeError(f"CUDA out of memory at device_batch_size 1 (depth {config.depth}, "
                                       f"max_seq_len {config.max_seq_len}): the model does not fit on "
                                       f"{device_name}; lower depth or max_seq_len") from error
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                loop.device_batch_size = halved_batch_size(loop.device_batch_size)
                print(f"step {step + 1:05d} | CUDA out of memory: retrying with device_batch_size "
                      f"{loop.device_batch_size}, {grad_accum_steps()} accumulation steps", flush=True)
                loader.close()
                loader = make_loader(loop.device_batch_size, loader_at_step_start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - step_start
        step += 1
        session_steps += 1

        if session_steps > 1:  # the first step of a session pays for warm-up and compilation
            loop.timed_steps += 1
            loop.timed_seconds += dt
        loop.skipped_steps += result.skipped
        loop.loss_ema = LOSS_EMA_BETA * loop.loss_ema + (1 - LOSS_EMA_BETA) * result.loss
        loop.total_time_s = time_before_session + time.perf_counter() - session_start
        if master:
            tok_per_sec = config.total_batch_size / dt
            step_mfu = mfu_percent(tok_per_sec)
            lrm = lr_multiplier(step - 1, config)
            smoothed = loop.smoothed_loss(step)
            metrics = {"train/loss": result.loss, "train/loss_smooth": smoothed, "train/lrm": lrm,
                       **learning_rates(optimizers), "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                       "train/mfu": step_mfu, "train/grad_norm": result.grad_norm,
                       "train/skipped_steps": loop.skipped_steps}
            if device.type == "cuda":
                metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if grad_scaler:
                metrics["train/grad_scale"] = grad_scaler.get_scale()
            tracker.log(step, metrics)
            mean_dt = loop.timed_seconds / loop.timed_steps if loop.timed_steps else dt
            eta = (config.num_iterations - step) * mean_dt
            print(f"step {step:05d}/{config.num_iterations:05d} ({100 * step / config.num_iterations:.2f}%) | "
                  f"loss: {smoothed:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | "
                  f"mfu: {'n/a' if step_mfu is None else f'{step_mfu:.2f}'} | "
                  f"total time: {format_minutes(loop.total_time_s)} | eta: {eta / 60:.1f}m"
                  + (" | skipped (fp16 overflow)" if result.skipped else ""), flush=True)

    loop.total_time_s = time_before_session + time.perf_counter() - session_start
    loader.close()
    result = summary("completed", step)
    if master:
        save(step, "completed")
        tracker.set_summary(result)
        result["wandb_url"] = tracker.finish()
        write_json(out_dir / TRAINING_STATE_FILE, result)
        write_report(out_dir, config, env_report, result)
        if on_save:
            on_save(out_dir)
    if own_process_group:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a RunConfig preset (YAML or JSON); defaults to the reference run")
    parser.add_argument("--data-dir", type=Path, required=True, help="a prepared data directory")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the checkpoint directory is written")
    parser.add_argument("--resume-dir", type=Path, help="a checkpoint directory to continue from")
    args = parser.parse_args(argv)
    rank = distributed_env()[0]
    summary = train(load_config(args.config), args.data_dir, args.out_dir, resume_dir=args.resume_dir,
                    env_report=environment_report() if rank == 0 else None)
    if rank == 0:
        print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
