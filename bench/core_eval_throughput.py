"""CORE evaluation throughput: examples per second of nanochat_flyte.evaluation.core on a generated bundle.

    python bench/core_eval_throughput.py                                     # d8, random weights, context 512
    python bench/core_eval_throughput.py --depth 2 --seq-len 256 --examples-per-task 40 --device cpu
    python bench/core_eval_throughput.py --checkpoint DIR_OR_URI --batch-size 64

The generated bundle (tests/core_bundle.py) has the shapes of the real tasks: multiple choice with 4 choices, schema
with 2 contexts, language modeling; 10-shot and 0-shot; sentences of 8-30 words (10-shot prompts overflow a 512-token
context, as hellaswag's do). It also times rendering + tokenization alone: the part that runs on the CPU whatever
the device.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.core_bundle, when run as a script

from nanochat_flyte.config import DEVICES  # noqa: E402
from nanochat_flyte.evaluation.bundle import load_bundle
from nanochat_flyte.evaluation.core import item_rows, score_core  # noqa: E402
from nanochat_flyte.model.checkpoint import load_model  # noqa: E402
from nanochat_flyte.model.device import select_device, select_precision  # noqa: E402
from tests.core_bundle import generated_tasks, write_core_bundle  # noqa: E402
from tests.helpers import random_gpt  # noqa: E402

SHOTS = 10  # as most CORE tasks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="score this model instead of a randomly initialised one")
    parser.add_argument("--depth", type=int, default=8, help="of the random model")
    parser.add_argument("--seq-len", type=int, default=512, help="context of the random model")
    parser.add_argument("--examples-per-task", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="rows (choices) per forward pass")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    if args.examples_per_task <= SHOTS:
        parser.error(f"--examples-per-task must be > {SHOTS}: a {SHOTS}-shot item's examples are other items")

    device = select_device(args.device)
    precision = select_precision(device, args.dtype)
    if args.checkpoint:
        loaded = load_model(args.checkpoint, device)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = random_gpt(args.depth, args.seq_len, device)
    context_len = model.config.sequence_len
    with tempfile.TemporaryDirectory() as directory:
        bundle = load_bundle(write_core_bundle(Path(directory), args.examples_per_task, tasks=generated_tasks(SHOTS),
                                               words=(8, 30)))

    start = time.perf_counter()
    rows = [row for task in bundle.tasks for item in item_rows(tokenizer, task, list(range(len(task.examples))),
                                                               context_len) for row in item]
    tokenize_seconds = time.perf_counter() - start
    examples = sum(len(task.examples) for task in bundle.tasks)
    tokens = sum(len(row.tokens) for row in rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {device_name} ({precision.name}) | {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"context {context_len} | {len(bundle.tasks)} tasks, {examples} examples, {len(rows)} rows, "
          f"{tokens / len(rows):.0f} tokens per row | batch size {args.batch_size}", flush=True)
    print(f"rendering + tokenization alone: {examples / tokenize_seconds:.0f} examples/s "
          f"({len(rows) / tokenize_seconds:.0f} rows/s, one process)", flush=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
    result = score_core(model, tokenizer, bundle, batch_size=args.batch_size, device=device, precision=precision)
    seconds = result["seconds"]
    print(f"CORE evaluation: {examples} examples in {seconds:.1f}s = {examples / seconds:.1f} examples/s "
          f"({len(rows) / seconds:.1f} rows/s, {tokens / seconds:,.0f} tokens/s)", flush=True)
    return {"examples_per_sec": examples / seconds, "rows_per_sec": len(rows) / seconds,
            "tokens_per_sec": tokens / seconds}


if __name__ == "__main__":
    main()
