"""Score a base checkpoint on CORE, the DCLM benchmark nanochat reports for base models.

examples:
  nanochat core-eval --checkpoint runs/base --bundle eval_bundle.zip --max-per-task 100
  nanochat core-eval --checkpoint s3://my-bucket/runs/base

Prints a table of the tasks' accuracies, then the result as one JSON object on its last line.
"""

import json
from typing import Any

from nanochat_flyte.cli.usage import (
    ArgumentParser,
    add_checkpoint_flag,
    add_device_flag,
    int_at_least,
    require_checkpoint_flag,
)
from nanochat_flyte.config import DTYPES, EVAL_BUNDLE_MAX_SHOTS, EVAL_BUNDLE_URL
from nanochat_flyte.evaluation.bundle import load_bundle
from nanochat_flyte.evaluation.core import check_max_per_task, core_table_markdown, score_core
from nanochat_flyte.model.checkpoint import load_model
from nanochat_flyte.model.device import select_device, select_precision


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser("core-eval", __doc__)
    add_checkpoint_flag(parser)
    parser.add_argument("--bundle", default=EVAL_BUNDLE_URL, help="eval bundle: zip or directory, path or URL")
    parser.add_argument("--max-per-task", type=int_at_least(0), default=0,
                        help="evaluate a fixed, seeded subset of N items of each task (0, the default: every item)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="rows (choices) per forward pass")
    add_device_flag(parser)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    args = parser.parse_args(argv)
    device = select_device(args.device)
    precision = select_precision(device, args.dtype)
    require_checkpoint_flag(parser, args.checkpoint)  # a wrong path fails before the bundle's download
    if args.bundle == EVAL_BUNDLE_URL and 0 < args.max_per_task <= EVAL_BUNDLE_MAX_SHOTS:  # (known before it is had)
        parser.error(f"argument --max-per-task: {args.max_per_task} items per task leave nanochat's CORE bundle's "
                     f"{EVAL_BUNDLE_MAX_SHOTS}-shot prompts too few others to draw their examples from: give at least "
                     f"{EVAL_BUNDLE_MAX_SHOTS + 1}, or 0 for every item")
    bundle = load_bundle(args.bundle)  # a bad bundle fails before a large checkpoint is loaded
    check_max_per_task(bundle, args.max_per_task, "max_per_task", "core-eval")
    loaded = load_model(args.checkpoint, device)
    result = score_core(loaded.model, loaded.tokenizer, bundle, max_per_task=args.max_per_task or None,
                           batch_size=args.batch_size, device=device, precision=precision)
    print(core_table_markdown(result))
    print(json.dumps(result), flush=True)
    return result
