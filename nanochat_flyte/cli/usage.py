"""How our commands read their arguments, and end on a user's mistake: one line on stderr naming the problem, exit
status 2.

A traceback is for bugs. A misspelt field, a missing checkpoint, an unreachable URL or a malformed conversation is
the user's to fix, and the one line that says what to fix must not drown in forty lines of stack.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from nanochat_flyte.config import DEVICES
from nanochat_flyte.errors import ConfigError, is_object_store_error, is_storage_error, is_user_error, user_message

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

    def parse_args(self, args=None, namespace=None):
        """field=value overrides may come before, between and after the flags (argparse alone takes a command's
        positional arguments in one run only: `train depth=2 --data-dir D num_iterations=1` would be refused)."""
        return self.parse_intermixed_args(args, namespace)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else argparse's one line naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def local_dir(text: str) -> Path:
    """An argparse type: a local directory's path. A URI (s3://...) is refused in argparse's one line naming the
    flag, where Path would make a relative folder of it ("s3:/bucket/run")."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"a local directory, got the URI {text!r} (a run's copy in an object store "
                                         "goes to its save_to; one to read, copy to this machine first)")
    if not text.strip():  # Path("") is the current directory
        raise argparse.ArgumentTypeError("empty: give a folder")
    if Path(text).resolve() == Path("/"):
        raise argparse.ArgumentTypeError("the root folder: give a folder of its own")
    return Path(text)


def add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    """--checkpoint for the commands that load a trained model."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or fsspec URI (s3://, gs://, ...)")


def require_checkpoint_flag(parser: argparse.ArgumentParser, location: str) -> None:
    """The parser's one line naming --checkpoint unless `location` holds a checkpoint: called once the other flags
    are checked (each names its own mistake first), before anything is downloaded or loaded."""
    from nanochat_flyte.model.checkpoint import require_checkpoint  # torch: not for `nanochat --help`

    try:
        require_checkpoint(location)
    except Exception as error:  # none there; or a store that cannot be read (no credentials, no such host)
        if not (is_user_error(error) or is_storage_error(error) or is_object_store_error(error)):
            raise
        parser.error(f"argument --checkpoint: {user_message(error)}")


def available_device(name: str) -> str:
    """An argparse type: a device torch sees here (auto: the best one), else one line naming --device."""
    from nanochat_flyte.model.device import select_device  # torch: not for `nanochat --help`

    try:
        select_device(name)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(error.problem) from None
    return name


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", type=available_device, help=f"one of {', '.join(DEVICES)}")


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """--compile for the commands that decode (Engine(compile=True))."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: for a GPU, where launching one kernel per operation "
                             "limits one prompt's decoding; the first answer waits for the compilation (no gain on "
                             "a CPU)")


def run(main: Callable[[], object]) -> None:
    """Call a command's main(); a user error becomes one line and exit status 2."""
    try:
        try:
            main()
        finally:  # what is still buffered goes now, inside the try, not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:  # the reader left early (`| head`): end quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
        sys.exit(141)  # the shell's status for a command its pipe's reader stopped
    except Exception as error:
        if another_rank_failed(error):
            cause = str(error).strip().splitlines()[0][:300]
            print(f"error: rank {os.environ.get('RANK')} lost another rank, whose own error says why ({cause})",
                  file=sys.stderr)
            sys.exit(1)
        if not is_user_error(error):
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT)
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for Ctrl-C


# What a collective says when the process of another rank has ended: gloo's, and NCCL's
PEER_LOST = ("Connection closed by peer", "remote process exited")


def another_rank_failed(error: Exception) -> bool:
    """Under torchrun, a collective (a gradient all-reduce) that broke because another rank's process ended (its own
    error, printed too, says why): this rank's traceback would bury that line. Not a failure of this rank's own
    (a store or network error at the start, NCCL without shared memory): those keep their traceback."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and any(text in str(error) for text in PEER_LOST)


def launcher_words(command: str) -> list[str]:
    """How the running command was launched, for a command line that continues it: `nanochat COMMAND`, or under
    torchrun `torchrun ... -m nanochat_flyte COMMAND` with this node's processes (and nodes: add the rendezvous)."""
    world_size, local_world_size = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world_size < 2:
        return ["nanochat", command]
    nodes = ["--standalone"] if world_size == local_world_size else [f"--nnodes={world_size // local_world_size}"]
    return ["torchrun", *nodes, f"--nproc_per_node={local_world_size}", "-m", "nanochat_flyte", command]
