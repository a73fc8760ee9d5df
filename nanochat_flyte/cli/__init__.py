"""The `nanochat` command: one subcommand per stage of the pipeline, each a module of this package.

    nanochat prepare --config configs/smoke.yaml --out-dir runs/data
    nanochat train --config configs/smoke.yaml --data-dir runs/data --out-dir runs/base

The top of the import order: it may import every other sub-package, and nothing imports it (the `nanochat`
script and `python -m nanochat_flyte` run it).
"""

import difflib
import importlib
import sys

from nanochat_flyte.cli.usage import USAGE_ERROR_EXIT, run

# name -> (module, what it does), in pipeline order; `nanochat NAME --help` says more, with examples
COMMANDS = {
    "config": ("config", "check a preset with overrides and write it as the JSON `pyflyte run --config` takes"),
    "prepare": ("prepare", "download and tokenize the shards a run needs into a data directory"),
    "train": ("train", "pretrain a base model on a prepared data directory"),
    "core-eval": ("core_eval", "score a base checkpoint on CORE (the DCLM benchmark)"),
    "sft": ("sft", "fine-tune a base checkpoint on conversations: a chat checkpoint"),
    "rl": ("rl", "reinforcement learning of a chat checkpoint on GSM8K"),
    "chat-eval": ("chat_eval", "score a checkpoint on ARC, MMLU, GSM8K and HumanEval"),
    "sample": ("sample", "continue a prompt with a checkpoint"),
    "chat": ("chat", "talk to a checkpoint in the terminal"),
    "serve": ("serve", "a chat page and an OpenAI-compatible API for a checkpoint"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: nanochat COMMAND [--help] [ARGS ...]\n\nnanochat-class GPT training, evaluation and chat, on a "
            "laptop or under torchrun.\n\ncommands, in pipeline order:\n" + "\n".join(lines) +
            "\n\n`nanochat COMMAND --help` says what each takes, with examples.\n")


def main(argv: list[str] | None = None) -> None:
    run(lambda: dispatch(sys.argv[1:] if argv is None else argv))


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        sys.exit(0 if argv else USAGE_ERROR_EXIT)
    name, *args = argv
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(COMMANDS)}"
        print(f"error: unknown command {name!r}; {hint} (see nanochat --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT)
    importlib.import_module(f"nanochat_flyte.cli.{COMMANDS[name][0]}").main(args)
