"""Training throughput of one config on this machine: tokens/s and MFU, measured with the real train step.

    python bench/train_throughput.py                      # the d8 reference config
    python bench/train_throughput.py --depth 2 --seq-len 64 --device-batch-size 4 --total-batch-size 512 --steps 5
    python bench/train_throughput.py --dtype float16 --profile-steps 2   # on CUDA: where the step's GPU time goes
    python bench/train_throughput.py --dtype float16 --loss-chunk-tokens 2048 --device-batch-size 64
    python bench/train_throughput.py --dtype float16 --muon-batched --profile-steps 2
    python bench/train_throughput.py --dtype float16 --compile-mode reduce-overhead   # CUDA graphs
    python bench/train_throughput.py --no-compile --ignored-fraction 0.8   # SFT-like rows: 80% of targets ignored

It also projects the 1000-iteration reference run (d8, 65,536 tokens per step) onto a T4 at the MFU it measured:
MFU carries across GPUs far better than tokens/s does. Random tokens stand in for data: in training the loader
prefetches, so reading data is not part of a step's time.
"""

import argparse
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from nanochat_flyte.config import COMPILE_MODES, DEVICES, RunConfig
from nanochat_flyte.model.device import mfu, peak_flops, replays_cuda_graphs, select_precision
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.model.optim import build_optimizers
from nanochat_flyte.training.loop import (
    build_model,
    compile_model,
    make_grad_scaler,
    train_step,
    training_device,
)

GPT2_VOCAB_SIZE = 50257
# Issue 25's speed levers, all on: each micro-batch replayed as CUDA graphs, Muon batched by shape, the loss in
# chunks of 2,048 tokens (4 per micro-batch of 16 x 512). Off by default until a GPU measurement says they help;
# the acceptance and the side by side with nanochat measure them beside the defaults.
SPEED_LEVERS = {"compile_mode": "reduce-overhead", "muon_batched": True, "loss_chunk_tokens": 2048}
T4_PEAK_FP16_FLOPS = 65e12  # dense fp16 tensor-core peak, from NVIDIA's T4 datasheet

# How the profile sorts CUDA kernels, by (lower-cased) kernel name. cuBLAS and CUTLASS name their matrix
# kernels *gemm* / *xmma* / (cuBLAS 12.8+ on Hopper) nvjet_*; Inductor's matmul templates are triton_tem_*.
MATMUL_MARKS = ("gemm", "xmma", "cutlass", "nvjet", "triton_tem")
ATTENTION_MARKS = ("flash", "fmha", "attention")
# The logits' softcap (the model's only tanh) and the cross-entropy: eager kernel names and Inductor's fused ones
LOSS_MARKS = ("tanh", "softmax", "nll_loss", "cross_entropy")
OPTIMIZER_REGION = "Optimizer."  # torch wraps every optimizer.step() in a profiler range "Optimizer.step#Muon.step"
CATEGORIES = ("matmul: blocks", "matmul: lm_head (logits)", "attention", "logits softcap + loss",
              "optimizer step", "other (memory-bound)")


def reference_run_flops() -> float:
    """Training FLOPs of the reference run: FLOPs/token of the d8 model x tokens per step x steps."""
    reference = RunConfig()
    with torch.device("meta"):  # the FLOP count needs the shapes only, not memory
        model = GPT(GPTConfig.from_depth(reference.depth, GPT2_VOCAB_SIZE, reference.max_seq_len))
    return model.estimate_flops() * reference.total_batch_size * reference.num_iterations


# ---------------------------------------------------------------------- the profile of a step


@dataclass
class KernelTime:
    name: str  # the CUDA kernel
    microseconds: float
    op_shapes: list  # input shapes of the operator that launched it (record_shapes)
    region: str  # the enclosing optimizer range ("Optimizer.step#AdamW.step"), or ""


def kernel_category(kernel: KernelTime, padded_vocab_size: int) -> str:
    """One of CATEGORIES: which part of the step a kernel's time belongs to."""
    if kernel.region.startswith(OPTIMIZER_REGION):
        return "optimizer step"
    name = kernel.name.lower()
    if any(mark in name for mark in MATMUL_MARKS):
        lm_head = any(isinstance(shape, list) and padded_vocab_size in shape for shape in kernel.op_shapes)
        return "matmul: lm_head (logits)" if lm_head else "matmul: blocks"
    if any(mark in name for mark in ATTENTION_MARKS):
        return "attention"
    if any(mark in name for mark in LOSS_MARKS):
        return "logits softcap + loss"
    return "other (memory-bound)"


def summarize_kernels(kernels: list[KernelTime], steps: int, step_ms: float, gpu_microseconds: float,
                      padded_vocab_size: int, top: int = 8) -> dict:
    """Per-step milliseconds by category and the costliest kernels. step_ms is a step's time without the
    profiler; gpu_microseconds all device activity (kernels, copies, memsets) over the profiled steps: what
    no operator launched shows as 'unattributed'."""
    by_category: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    by_kernel: dict[tuple[str, str], float] = defaultdict(float)  # (kernel, category): one kernel can serve two
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for kernel in kernels:
        category = kernel_category(kernel, padded_vocab_size)
        by_category[category] += kernel.microseconds
        by_kernel[kernel.name, category] += kernel.microseconds
        calls[kernel.name, category] += 1
    attributed = sum(by_category.values())
    by_category["unattributed"] = max(gpu_microseconds - attributed, 0.0)
    gpu_ms = max(gpu_microseconds, attributed) / 1000 / steps
    matmul_ms = (by_category["matmul: blocks"] + by_category["matmul: lm_head (logits)"]) / 1000 / steps
    return {
        "steps": steps, "step_ms": step_ms, "gpu_busy_ms": gpu_ms,
        "gpu_idle_percent": 100 * max(step_ms - gpu_ms, 0.0) / step_ms,  # launch gaps, host work, syncs
        "matmul_percent_of_gpu": 100 * matmul_ms / gpu_ms if gpu_ms else None,
        "categories_ms": {name: us / 1000 / steps for name, us in by_category.items()},
        "top_kernels": [{"name": name[:120], "category": category, "ms": us / 1000 / steps,
                         "calls_per_step": calls[name, category] / steps}
                        for (name, category), us in sorted(by_kernel.items(), key=lambda item: -item[1])[:top]],
    }


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Time covered by at least one interval: kernels on two streams at once count once."""
    busy, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy


def profile_steps(run_step: Callable[[], None], steps: int, step_ms: float, padded_vocab_size: int) -> dict:
    """torch.profiler over `steps` calls of run_step (CUDA only): where a step's GPU time goes. step_ms, the
    step's time measured without the profiler, is what the GPU's busy time is compared with."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    events = prof.events()
    # Device-side work only: the profiler also puts each record_function range (the optimizer's, the
    # compiled graph's) on the GPU timeline, spanning the work inside it and the gaps between.
    device_events = [event for event in events
                     if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)]
    kernels = []
    for event in events:  # each kernel hangs on the operator that launched it
        if event.device_type != DeviceType.CPU or not event.kernels:
            continue
        region, parent = "", event
        while parent is not None and not region:  # the operator itself or a range around it
            region = parent.name if parent.name.startswith(OPTIMIZER_REGION) else ""
            parent = parent.cpu_parent
        kernels += [KernelTime(kernel.name, kernel.duration, list(event.input_shapes or []), region)
                    for kernel in event.kernels]
    attributed = bool(kernels)
    if not attributed:  # this torch linked no kernel to an operator: sort by kernel names alone
        kernels = [KernelTime(event.name, event.time_range.elapsed_us(), [], "") for event in device_events]
    gpu_us = busy_microseconds([(event.time_range.start, event.time_range.end) for event in device_events])
    result = {**summarize_kernels(kernels, steps, step_ms, gpu_us, padded_vocab_size),
              "kernels_linked_to_operators": attributed}
    if not device_events:  # not an idle GPU: a profiler that saw none of its work
        result.update(gpu_busy_ms=None, gpu_idle_percent=None,
                      note="the profiler recorded no GPU work (kernels replayed from CUDA graphs can escape it)")
    return result


# ---------------------------------------------------------------------- timing


def measure(config: RunConfig, steps: int, warmup_steps: int, profile: int = 0,
            log: Callable[[str], None] = print, ignored_fraction: float = 0.0) -> dict:
    """Time `steps` optimizer steps of config's model (after warmup_steps untimed ones: compilation, allocator)
    on random tokens; with profile > 0 (CUDA), also profile that many more steps. ignored_fraction: that share of
    the targets is -1, as SFT ignores what is not the assistant's and RL what the model did not sample (tokens/s
    and MFU still count every position)."""
    device = training_device(config)
    precision = select_precision(device, config.dtype)
    model = build_model(config, GPT2_VOCAB_SIZE, device)
    optimizers = build_optimizers(model, config)
    grad_scaler = make_grad_scaler(precision, device)
    compiled = compile_model(model, config, device)
    grad_accum_steps = config.grad_accum_steps()
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (config.device_batch_size, config.max_seq_len + 1), device=device)
    ignored = torch.rand(tokens[:, 1:].shape, generator=torch.Generator().manual_seed(0)) < ignored_fraction
    batch = (tokens[:, :-1], tokens[:, 1:].masked_fill(ignored.to(device), -1))

    def endless_batch():
        while True:
            yield batch

    batches = endless_batch()
    on_cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if on_cuda else device.type
    loss = f"loss in chunks of {config.loss_chunk_tokens} tokens" if config.loss_chunk_tokens else "plain loss"
    cuda_graphs = replays_cuda_graphs(config.compile, config.compile_mode, device)
    compiled_as = f"compile {config.compile_mode}" if compiled is not model else "eager"
    log(f"device: {device_name} ({precision.name}, {compiled_as}, {loss}, muon batched {config.muon_batched}) | "
        f"depth {config.depth}, "
        f"{model.num_params():,} parameters, {model.estimate_flops():.3e} FLOPs/token | "
        f"batch {config.device_batch_size} x {config.max_seq_len}, {grad_accum_steps} accumulation steps"
        + (f", {ignored_fraction:.0%} of targets ignored" if ignored_fraction else ""))

    def run_step() -> None:
        train_step(compiled, optimizers, batches, grad_accum_steps, precision, grad_scaler, config.grad_clip,
                   cuda_graphs=cuda_graphs)

    def timed(count: int) -> float:
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            run_step()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    skips_before = counters["inductor"]["cudagraph_skips"]
    warmup_seconds = timed(warmup_steps)
    seconds = timed(steps)
    # Inductor falls back to running a graph's kernels one by one, with a log line only, when it cannot record it:
    # counted, so that a reduce-overhead figure that is really the default compile's says so
    cudagraph_skips = counters["inductor"]["cudagraph_skips"] - skips_before
    tok_per_sec = steps * config.total_batch_size / seconds
    utilisation = mfu(model.estimate_flops(), tok_per_sec, peak_flops(device_name, precision.dtype))
    result = {"device_name": device_name, "dtype": precision.name, "compile": compiled is not model,
              "compile_mode": config.compile_mode if compiled is not model else None,
              "depth": config.depth, "seq_len": config.max_seq_len, "device_batch_size": config.device_batch_size,
              "total_batch_size": config.total_batch_size, "grad_accum_steps": grad_accum_steps,
              "loss_chunk_tokens": config.loss_chunk_tokens, "muon_batched": config.muon_batched,
              "ignored_fraction": ignored_fraction,
              "num_params": model.num_params(), "flops_per_token": model.estimate_flops(),
              "warmup_steps": warmup_steps, "warmup_s": warmup_seconds, "steps": steps,
              "ms_per_step": 1000 * seconds / steps, "tok_per_sec": tok_per_sec, "mfu": utilisation,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
              "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else None,
              "cudagraph_skips": cudagraph_skips if cuda_graphs else None}
    log(f"step time: {result['ms_per_step']:.1f} ms | tokens/s: {tok_per_sec:,.0f} | "
        f"MFU: {'n/a' if utilisation is None else f'{100 * utilisation:.2f}%'}"
        + (f" | peak memory {result['peak_memory_gib']:.2f} GiB | warm-up {warmup_seconds:.1f} s" if on_cuda else "")
        + (f" | CUDA graphs skipped {cudagraph_skips} times: not replayed" if cudagraph_skips and cuda_graphs else ""))
    if profile and on_cuda:
        result["profile"] = profile_steps(run_step, profile, result["ms_per_step"], model.config.padded_vocab_size)
        result["profile"]["mfu_if_never_idle"] = mfu_if_never_idle(utilisation, result["profile"])
        if cuda_graphs and result["profile"]["gpu_busy_ms"]:
            # a replayed graph's kernels hang on no operator with input shapes: the head's products can only count
            # as the blocks'; and CUPTI times graph kernels less reliably before CUDA 13.1
            result["profile"]["note"] = ("kernels replayed from CUDA graphs: the lm_head products count under the "
                                         "blocks' matmuls; busy time as CUPTI reports it for graph replays")
        log(format_profile(result["profile"]))
    return result


def mfu_if_never_idle(utilisation: float | None, profile: dict) -> float | None:
    """The MFU of the step's GPU work alone: what removing every launch gap and host wait (CUDA graphs, larger
    micro-batches) could reach at most, before any kernel gets faster."""
    if utilisation is None or not profile["gpu_busy_ms"]:
        return None
    return utilisation * profile["step_ms"] / profile["gpu_busy_ms"]


def format_profile(profile: dict) -> str:
    if profile["gpu_busy_ms"] is None:
        return f"profile: {profile['step_ms']:.1f} ms/step; {profile['note']}"
    bound = profile.get("mfu_if_never_idle")
    lines = [f"profile: {profile['step_ms']:.1f} ms/step, GPU busy {profile['gpu_busy_ms']:.1f} ms "
             f"({profile['gpu_idle_percent']:.0f}% idle)"
             + ("" if bound is None else f"; MFU if the GPU were never idle: {100 * bound:.1f}%")]
    if profile.get("note"):
        lines.append(f"  ({profile['note']})")
    lines += [f"  {name:<26} {ms:8.2f} ms" for name, ms in profile["categories_ms"].items()]
    lines += [f"  top: {kernel['ms']:7.2f} ms x{kernel['calls_per_step']:<5g} {kernel['category']:<26} "
              f"{kernel['name'][:70]}"
              for kernel in profile["top_kernels"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    reference = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=reference.depth)
    parser.add_argument("--device-batch-size", type=int, default=reference.device_batch_size)
    parser.add_argument("--seq-len", type=int, default=reference.max_seq_len)
    parser.add_argument("--total-batch-size", type=int, default=reference.total_batch_size,
                        help="tokens per optimizer step (sets the gradient accumulation)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=reference.compile,
                        help="torch.compile the model (CUDA only, as in training)")
    parser.add_argument("--compile-mode", default=reference.compile_mode, choices=COMPILE_MODES,
                        help="RunConfig.compile_mode: reduce-overhead replays each micro-batch as CUDA graphs")
    parser.add_argument("--loss-chunk-tokens", type=int, default=reference.loss_chunk_tokens,
                        help="RunConfig.loss_chunk_tokens: 0 for the plain loss, N for lm_head + loss N tokens "
                             "at a time")
    parser.add_argument("--muon-batched", action=argparse.BooleanOptionalAction, default=reference.muon_batched,
                        help="RunConfig.muon_batched: Muon's update for all matrices of one shape at once")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="CUDA: profile this many more steps and print where the GPU time goes")
    parser.add_argument("--ignored-fraction", type=float, default=0.0,
                        help="the share of targets set to -1 (SFT, RL: only some tokens are trained)")
    args = parser.parse_args(argv)
    if not 0 <= args.ignored_fraction < 1:
        parser.error(f"--ignored-fraction must be in [0, 1), got {args.ignored_fraction}")

    config = dataclasses.replace(reference, depth=args.depth, device_batch_size=args.device_batch_size,
                                 max_seq_len=args.seq_len, total_batch_size=args.total_batch_size, dtype=args.dtype,
                                 device=args.device, compile=args.compile, compile_mode=args.compile_mode,
                                 loss_chunk_tokens=args.loss_chunk_tokens,
                                 muon_batched=args.muon_batched, eval_tokens=args.seq_len + 1).validate()
    result = measure(config, args.steps, args.warmup_steps, profile=args.profile_steps,
                     log=lambda line: print(line, flush=True), ignored_fraction=args.ignored_fraction)
    utilisation = result["mfu"]
    if utilisation is None:
        t4_minutes = None
        print("reference run on a T4: n/a (no MFU on this device: its peak FLOP/s are unknown)", flush=True)
    else:
        t4_minutes = reference_run_flops() / (utilisation * T4_PEAK_FP16_FLOPS) / 60
        print(f"reference run on a T4 (d8, {reference.num_iterations} x {reference.total_batch_size:,} tokens) at "
              f"{100 * utilisation:.2f}% MFU: {t4_minutes:.1f} minutes", flush=True)
    return {**result, "t4_reference_minutes": t4_minutes}


if __name__ == "__main__":
    main()
