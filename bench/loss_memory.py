"""Peak memory of the output head's loss, forward and backward, at the reference shape: the plain path (the logits
of every position at once) against the chunked one (RunConfig.loss_chunk_tokens; nanochat_flyte/model/chunked_loss.py).

    python bench/loss_memory.py                                  # 16 x 512 tokens, dim 512, GPT-2's vocabulary
    python bench/loss_memory.py --chunks 0,1024 --dtypes float32 --tokens 1024

Each measurement runs in a fresh process on the CPU: a model without blocks and the tokens are made first, then the
loss through GPT.forward, its backward pass and the gradients, as one row of 8,192 tokens. The figure is the
process's peak resident memory (VmHWM) less its resident memory just before the loss: what the loss needs on top
of its inputs. glibc is told to map every allocation over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the process at once and the peak counts live tensors, not the allocator's free lists.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanochat_flyte.model.gpt import GPT, GPTConfig  # noqa: E402

GPT2_VOCAB_SIZE = 50257
MMAP_THRESHOLD_BYTES = 65536


def resident_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak so far) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(tokens: int, dim: int, chunk_tokens: int, dtype: str) -> dict:
    """In this process: the loss's peak memory over its inputs (MiB) and its time, forward and backward, through
    GPT.forward of a model with no blocks (embedding, norm, lm_head and the loss; the blocks do not change the
    loss's memory)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=tokens, vocab_size=GPT2_VOCAB_SIZE, n_layer=0, n_head=1, n_kv_head=1,
                          n_embd=dim), loss_chunk_tokens=chunk_tokens)
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the head: every logit would be 0
        model.lm_head.weight.normal_(0.0, 0.02)
    inputs, targets = torch.randint(0, GPT2_VOCAB_SIZE, (2, 1, tokens))
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = model(inputs, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "dim": dim, "vocab_size": GPT2_VOCAB_SIZE, "chunk_tokens": chunk_tokens,
            "dtype": dtype, "peak_mib": (resident_kib("VmHWM") - before) / 1024, "seconds": seconds,
            "loss": loss.item()}


def measure_in_fresh_process(tokens: int, dim: int, chunk_tokens: int, dtype: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    result = subprocess.run([sys.executable, __file__, "--tokens", str(tokens), "--dim", str(dim), "--one",
                             f"{chunk_tokens}:{dtype}"], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 * 512, help="tokens of a micro-batch (16 x 512)")
    parser.add_argument("--dim", type=int, default=512, help="model width (d8: 512)")
    parser.add_argument("--chunks", default="0,1024,2048,4096", help="loss_chunk_tokens values; 0 is the plain path")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32, and/or bfloat16 (CPU autocast)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: CHUNK:DTYPE, measured in this process
    args = parser.parse_args(argv)
    if args.one:
        chunk, dtype = args.one.split(":")
        print(json.dumps(measure(args.tokens, args.dim, int(chunk), dtype)))
        return []
    results = []
    print(f"loss forward + backward, {args.tokens:,} tokens x dim {args.dim} -> {GPT2_VOCAB_SIZE:,} logits each, CPU")
    for dtype in args.dtypes.split(","):
        plain_mib = None
        for chunk in (int(value) for value in args.chunks.split(",")):
            result = measure_in_fresh_process(args.tokens, args.dim, chunk, dtype)
            plain_mib = result["peak_mib"] if chunk == 0 else plain_mib
            vs_plain = "" if plain_mib is None or chunk == 0 else f" ({result['peak_mib'] / plain_mib:.1%} of plain)"
            path = "plain" if chunk == 0 else f"chunks of {chunk}"
            print(f"{dtype:>8} | {path:>15} | peak {result['peak_mib']:8.0f} MiB{vs_plain} | "
                  f"{result['seconds']:5.1f} s | loss {result['loss']:.6f}", flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
