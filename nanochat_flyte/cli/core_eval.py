"""Score a base checkpoint on CORE, the DCLM benchmark nanochat reports for base models.

examples:
  nanochat core-eval --checkpoint runs/base --bundle eval_bundle.zip --max-per-task 100
  nanochat core-eval --checkpoint s3://my-bucket/runs/base

Prints a table of the tasks' accuracies, then the result as one JSON object on its last line.
"""

import argparse
import json
from typing import Any

from nanochat_flyte.cli.usage import ArgumentParser
from nanochat_flyte.config import EVAL_BUNDLE_URL
from nanochat_flyte.evaluation.bundle import load_bundle
from nanochat_flyte.evaluation.core import core_table_markdown, score_core
from nanochat_flyte.model.checkpoint import load_model, require_checkpoint
from nanochat_flyte.model.device import select_device, select_precision


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser("core-eval", __doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or fsspec URI (s3://, gs://, ...)")
    parser.add_argument("--bundle", default=EVAL_BUNDLE_URL, help="eval bundle: zip or directory, path or URL")
    parser.add_argument("--max-per-task", type=positive_int, help="evaluate a fixed, seeded subset of each task")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows (choices) per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    device = select_device(args.device)
    precision = select_precision(device, args.dtype)
    require_checkpoint(args.checkpoint)  # a wrong path fails before the bundle's download
    bundle = load_bundle(args.bundle)  # a bad bundle fails before a large checkpoint is loaded
    loaded = load_model(args.checkpoint, device)
    result = score_core(loaded.model, loaded.tokenizer, bundle, max_per_task=args.max_per_task,
                           batch_size=args.batch_size, device=device, precision=precision)
    print(core_table_markdown(result))
    print(json.dumps(result), flush=True)
    return result
