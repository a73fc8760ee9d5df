"""How our commands read their arguments, and end on a user's mistake: one line on stderr naming the problem, exit
status 2.

A traceback is for bugs. A misspelt field, a missing checkpoint, an unreachable URL or a malformed conversation is
the user's to fix, and the one line that says what to fix must not drown in forty lines of stack.
"""

import argparse
import sys
from collections.abc import Callable

from nanochat_flyte.errors import is_user_error, user_message

USAGE_ERROR_EXIT = 2  # argparse's status for a usage error


class ArgumentParser(argparse.ArgumentParser):
    """argparse for a `nanochat` subcommand: its help is the command module's docstring (the first line says what it
    does, the rest shows examples), and a usage error is one line (argparse prints the whole usage first)."""

    def __init__(self, command: str, doc: str, **kwargs):
        summary, _, examples = doc.partition("\n")
        super().__init__(prog=f"nanochat {command}", description=summary, epilog=examples.strip("\n") or None,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_ERROR_EXIT, f"error: {message} (see {self.prog} --help)\n")


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """--compile for the commands that decode (Engine(compile=True))."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: for a GPU, where launching one kernel per operation "
                             "limits one prompt's decoding; the first answer waits for the compilation (no gain on "
                             "a CPU)")


def run(main: Callable[[], object]) -> None:
    """Call a command's main(); a user error becomes one line and exit status 2."""
    try:
        main()
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT)
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for Ctrl-C
