"""Inference engine throughput: how fast the one engine behind the chat CLI, the server and chat evaluation answers.

    python bench/engine_throughput.py                                   # d8, random weights, context 512
    python bench/engine_throughput.py --depth 4 --batch-sizes 1,8 --device cpu
    python bench/engine_throughput.py --checkpoint DIR_OR_URI
    python bench/engine_throughput.py --device cuda --compile [--compile-mode reduce-overhead]   # Engine(compile=)

Figures, each the median of --repeats runs (after one untimed run of each shape: allocator, compilation):
- prefill: milliseconds to read a prompt of --prompt-tokens tokens and choose the first reply token (what a user
  waits for before the first word appears);
- one prompt's decode: tokens per second after the prefill, one token at a time (the decode steps timed alone);
- batched decode: generated tokens per second for B prompts answered together in one batch, --new-tokens each, for
  each B of --batch-sizes, prefill included (greedy, and no stop token ends a row early: every row writes all its
  tokens).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from a bare checkout (the GPU machine)

from nanochat_flyte.config import COMPILE_MODES, DEVICES  # noqa: E402
from nanochat_flyte.inference.engine import Batch, Engine, SamplingParams  # noqa: E402
from nanochat_flyte.model.device import select_device, select_precision  # noqa: E402
from tests.helpers import random_gpt  # noqa: E402


def timed(engine: Engine, work) -> float:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained model instead of a randomly initialised one")
    parser.add_argument("--depth", type=int, default=8, help="of the random model")
    parser.add_argument("--seq-len", type=int, default=512, help="context of the random model")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (Engine(compile=True))")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    args = parser.parse_args(argv)
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]

    if args.checkpoint:
        loaded = Engine.from_checkpoint(args.checkpoint, args.device)
        model, tokenizer, precision, phase = loaded.model, loaded.tokenizer, loaded.precision, loaded.phase
    else:
        device = select_device(args.device)
        model, tokenizer = random_gpt(args.depth, args.seq_len, device)
        precision, phase = select_precision(device, "auto"), "base"
    engine = Engine(model.eval(), tokenizer, precision, phase, compile=args.compile, compile_mode=args.compile_mode)
    if args.prompt_tokens + args.new_tokens > engine.context:
        parser.error(f"--prompt-tokens + --new-tokens must fit the model's context of {engine.context} tokens")
    # random ordinary tokens: no <|endoftext|> or chat token among them, so no row stops early
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.tokenizer.n_vocab - 1000, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(max(batch_sizes))]
    with torch.no_grad():  # a stop token's logit becomes 0, far below the largest of 50k: greedy never picks it
        engine.model.lm_head.weight[sorted(engine.stop_ids)] = 0.0
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else engine.device.type
    compiled = f"compiled decode step ({args.compile_mode})" if args.compile else "eager"
    print(f"device: {device_name} ({engine.precision.name}, {compiled}) | "
          f"{sum(p.numel() for p in engine.model.parameters()):,} "
          f"parameters, context {engine.context} | prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens each", flush=True)

    def median_seconds(size: int, sampling: SamplingParams) -> float:
        timed(engine, lambda: engine.generate_batch(prompts[:size], sampling))  # warm-up: allocator, compilation
        return statistics.median(timed(engine, lambda: engine.generate_batch(prompts[:size], sampling))
                                 for _ in range(args.repeats))

    def decode_seconds() -> float:
        """One prompt's decode steps after its prefill, timed alone: the tokens after the first, one step each."""
        sequence = engine.sequence(prompts[0], params)
        batch = Batch(engine, max_len=engine.cache_len(len(sequence.prompt) + sequence.max_new))
        batch.add([sequence])

        def steps() -> None:
            while batch.sequences:
                batch.step()

        return timed(engine, steps) / (len(sequence.tokens) - 1)

    skips_before = counters["inductor"]["cudagraph_skips"]
    prefill_seconds = median_seconds(1, first)
    print(f"prefill: {1000 * prefill_seconds:.1f} ms for a {args.prompt_tokens}-token prompt", flush=True)
    result = {"device_name": device_name, "dtype": engine.precision.name, "compile": args.compile,
              "compile_mode": args.compile_mode if args.compile else None, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "prefill_ms": 1000 * prefill_seconds, "decode_tokens_per_sec": {}}
    for size in batch_sizes:
        seconds = median_seconds(size, params)
        rate = size * args.new_tokens / seconds
        result["decode_tokens_per_sec"][size] = rate
        print(f"batch {size}: {rate:,.0f} tokens/s ({size} x {args.new_tokens} tokens in {seconds:.2f} s, prefill "
              "included)", flush=True)
        if size == 1 and args.new_tokens > 1:  # the first token comes with the prefill; the rest one step each
            decode_seconds()  # warm-up
            result["one_prompt_decode_tokens_per_sec"] = 1 / statistics.median(decode_seconds()
                                                                               for _ in range(args.repeats))
            print(f"one prompt's decode: {result['one_prompt_decode_tokens_per_sec']:,.0f} tokens/s after the "
                  "prefill", flush=True)
    # Inductor runs a graph it cannot record eagerly, with a log line only: counted, so that a reduce-overhead figure
    # that is really the default compile's says so
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
    return result


if __name__ == "__main__":
    main()
