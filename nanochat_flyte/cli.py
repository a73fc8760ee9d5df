"""How our command-line tools end on a user's mistake: one line on stderr naming the problem, exit status 2.

A traceback is for bugs. A misspelt field, a missing checkpoint, an unreachable URL or a malformed conversation is
the user's to fix, and the one line that says what to fix must not drown in forty lines of stack.
"""

import argparse
import sys
from collections.abc import Callable

from nanochat_flyte.config import UserError

# Our modules' user errors (ConfigError, ConversationError, DownloadError, TokenizerError, BundleError, ...) derive
# from UserError; a missing checkpoint or preset is a FileNotFoundError.
USER_ERRORS = (UserError, FileNotFoundError)
USER_ERROR_EXIT = 2  # argparse's status for a usage error
# An object store (s3://, gs://) asked for without credentials: botocore's and google-auth's errors, named rather than
# imported, as neither package need be installed.
CREDENTIALS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}


def is_credentials_error(error: BaseException) -> bool:
    return any(kind.__name__ in CREDENTIALS_ERRORS for kind in type(error).__mro__)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or is_credentials_error(error)


def user_message(error: BaseException) -> str:
    if is_credentials_error(error):
        return (f"{error} for an object store URI (s3://, gs://): give this machine its credentials (AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)")
    return str(error)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (argparse prints the whole usage first), and the program is named
    as it is run: `python -m nanochat_flyte.<module>` (argparse would say `__main__.py`)."""

    def __init__(self, module: str, **kwargs):
        super().__init__(prog=f"python -m {module}", **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT, f"error: {message} (see {self.prog} --help)\n")


def run(main: Callable[[], object]) -> None:
    """Call a CLI's main(); a user error becomes one line and exit status 2."""
    try:
        main()
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for Ctrl-C
