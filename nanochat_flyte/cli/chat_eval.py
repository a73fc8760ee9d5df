"""Score a base or chat checkpoint on ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval.

examples:
  nanochat chat-eval --checkpoint runs/chat --max-per-task 50
  nanochat chat-eval --checkpoint runs/chat --tasks gsm8k,humaneval --humaneval on

The datasets come from the Hugging Face hub or the mirror in $HF_ENDPOINT. Prints a table, then the result as one
JSON object on its last line. HumanEval runs model-written code, only in the sandbox (docs/sandbox.md).
"""

import json

from nanochat_flyte.cli.usage import (
    ArgumentParser,
    add_checkpoint_flag,
    add_device_flag,
    int_at_least,
    require_checkpoint_flag,
)
from nanochat_flyte.config import CHAT_EVAL_TASKS, HUMANEVAL_MODES, ChatConfig
from nanochat_flyte.data.chat_data import load_eval_items, probe_eval_sources
from nanochat_flyte.data.download import DownloadError
from nanochat_flyte.evaluation.chat_eval import (
    TABLE_HEADER,
    chat_notes,
    chat_table_rows,
    evaluate_chat,
    require_sandbox,
)
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.reporting.report import markdown_grid


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser("chat-eval", __doc__)
    add_checkpoint_flag(parser)
    parser.add_argument("--tasks", default=",".join(CHAT_EVAL_TASKS), help="comma-separated, from: %(default)s")
    parser.add_argument("--max-per-task", type=int_at_least(0), default=0,
                        help="a fixed, seeded subset of N items per task; 0 = all")
    parser.add_argument("--batch-size", type=int_at_least(1), default=ChatConfig.eval_batch_size,
                        help="prompts scored or decoded together")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=ChatConfig.eval_max_tokens,
                        help="generation budget per GSM8K/HumanEval answer")
    parser.add_argument("--humaneval", default="auto", choices=HUMANEVAL_MODES,
                        help="runs model-written code in a sandbox; auto: only where the sandbox works here")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    # one line naming the field, before anything is loaded
    config = ChatConfig(eval_tasks=args.tasks, eval_max_per_task=args.max_per_task, eval_batch_size=args.batch_size,
                        eval_max_tokens=args.max_tokens, humaneval=args.humaneval, device=args.device).validate()
    tasks = config.eval_task_list
    if "humaneval" in tasks and args.humaneval == "on":
        require_sandbox()  # without a sandbox: fails here, not after the other tasks
    require_checkpoint_flag(parser, args.checkpoint)
    try:  # before the model loads: an unreachable hub is named before a large checkpoint is read
        probe_eval_sources(tasks)
        items_by_task = {task: load_eval_items(task) for task in tasks}
    except DownloadError as error:  # (once downloaded, the items are read from the cache, with no hub)
        raise DownloadError(error.what, error.url, f"{error.cause}; without the hub, point $HF_ENDPOINT at a mirror "
                                                   "(README: Offline and mirrors)") from None
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device)
    print(f"chat eval: {args.checkpoint}: a {engine.phase} checkpoint on {engine.device}, {engine.precision.name}",
          flush=True)
    result = evaluate_chat(engine, items_by_task, max_per_task=args.max_per_task, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, humaneval=args.humaneval)
    print(markdown_grid(TABLE_HEADER, chat_table_rows(result)))
    for note in chat_notes(result):
        print(note)
    print(json.dumps(result), flush=True)
    return result
