"""Training throughput of one config on this machine: tokens/s and MFU, measured with the real train step.

    python bench/train_throughput.py                      # the d8 reference config
    python bench/train_throughput.py --depth 2 --seq-len 64 --device-batch-size 4 --total-batch-size 512 --steps 5

It also projects the 1000-iteration reference run (d8, 65,536 tokens per step) onto a T4 at the MFU it measured:
MFU carries across GPUs far better than tokens/s does. Random tokens stand in for data: in training the loader
prefetches, so reading data is not part of a step's time.
"""

import argparse
import dataclasses
import time

import torch

from nanochat_flyte.config import RunConfig
from nanochat_flyte.device import mfu, peak_flops, select_precision
from nanochat_flyte.model import GPT, GPTConfig
from nanochat_flyte.optim import build_optimizers
from nanochat_flyte.train import build_model, compile_model, make_grad_scaler, train_step, training_device

GPT2_VOCAB_SIZE = 50257
T4_PEAK_FP16_FLOPS = 65e12  # dense fp16 tensor-core peak, from NVIDIA's T4 datasheet


def reference_run_flops() -> float:
    """Training FLOPs of the reference run: FLOPs/token of the d8 model x tokens per step x steps."""
    reference = RunConfig()
    with torch.device("meta"):  # the FLOP count needs the shapes only, not memory
        model = GPT(GPTConfig.from_depth(reference.depth, GPT2_VOCAB_SIZE, reference.max_seq_len))
    return model.estimate_flops() * reference.total_batch_size * reference.num_iterations


def main(argv: list[str] | None = None) -> dict:
    reference = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=reference.depth)
    parser.add_argument("--device-batch-size", type=int, default=reference.device_batch_size)
    parser.add_argument("--seq-len", type=int, default=reference.max_seq_len)
    parser.add_argument("--total-batch-size", type=int, default=reference.total_batch_size,
                        help="tokens per optimizer step (sets the gradient accumulation)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=reference.compile,
                        help="torch.compile the model (CUDA only, as in training)")
    args = parser.parse_args(argv)

    config = dataclasses.replace(reference, depth=args.depth, device_batch_size=args.device_batch_size,
                                 max_seq_len=args.seq_len, total_batch_size=args.total_batch_size, dtype=args.dtype,
                                 device=args.device, compile=args.compile, eval_tokens=args.seq_len + 1).validate()
    device = training_device(config)
    precision = select_precision(device, config.dtype)
    model = build_model(config, GPT2_VOCAB_SIZE, device)
    optimizers = build_optimizers(model, config)
    grad_scaler = make_grad_scaler(precision, device)
    compiled = compile_model(model, config, device)
    grad_accum_steps = config.grad_accum_steps()
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (config.device_batch_size, config.max_seq_len + 1), device=device)
    batch = (tokens[:, :-1], tokens[:, 1:])

    def endless_batch():
        while True:
            yield batch

    batches = endless_batch()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {device_name} ({precision.name}, compile {compiled is not model}) | depth {config.depth}, "
          f"{model.num_params():,} parameters, {model.estimate_flops():.3e} FLOPs/token | "
          f"batch {config.device_batch_size} x {config.max_seq_len}, {grad_accum_steps} accumulation steps", flush=True)

    def timed_step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(compiled, optimizers, batches, grad_accum_steps, precision, grad_scaler, config.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup_steps):
        timed_step()
    seconds = sum(timed_step() for _ in range(args.steps))
    tok_per_sec = args.steps * config.total_batch_size / seconds
    utilisation = mfu(model.estimate_flops(), tok_per_sec, peak_flops(device_name, precision.dtype))
    print(f"step time: {1000 * seconds / args.steps:.1f} ms | tokens/s: {tok_per_sec:,.0f} | "
          f"MFU: {'n/a' if utilisation is None else f'{100 * utilisation:.2f}%'}", flush=True)
    if utilisation is None:
        t4_minutes = None
        print("reference run on a T4: n/a (no MFU on this device: its peak FLOP/s are unknown)", flush=True)
    else:
        t4_minutes = reference_run_flops() / (utilisation * T4_PEAK_FP16_FLOPS) / 60
        print(f"reference run on a T4 (d8, {reference.num_iterations} x {reference.total_batch_size:,} tokens) at "
              f"{100 * utilisation:.2f}% MFU: {t4_minutes:.1f} minutes", flush=True)
    return {"tok_per_sec": tok_per_sec, "mfu": utilisation, "t4_reference_minutes": t4_minutes}


if __name__ == "__main__":
    main()
