"""What counts as the user's mistake, and the one line that says so.

A traceback is for bugs. A misspelt field, a missing checkpoint, an unreachable URL or a malformed conversation is
the user's to fix: our command-line tools print it as one line (cli/usage.py) and both Flyte fronts fail the task
with it, not retried (`reraise_user_errors`, each with its own kind of failure). Every module's user errors derive
from UserError. Imports nothing of the package.
"""

import contextlib
import functools
import inspect
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (a field, a path, a URL, a file's contents). Our CLIs print its message as one
    line (cli/usage.py) and the workflows show it without a traceback; every module's user errors derive from it."""


class ConfigError(UserError, ValueError):
    """A config field holds a value the run cannot use. The message names the field: `RunConfig.depth: ...`."""

    def __init__(self, field: str, problem: str, owner: str = "RunConfig"):
        self.field, self.problem = field, problem
        super().__init__(f"{owner}.{field}: {problem}")


# Our modules' user errors (ConfigError, ConversationError, DownloadError, TokenizerError, BundleError, ...) derive
# from UserError; a missing checkpoint or preset is a FileNotFoundError.
USER_ERRORS = (UserError, FileNotFoundError)
# An object store (s3://, gs://) asked for without credentials, or by someone it refuses: botocore's, google-auth's
# and obstore's errors, named rather than imported, as no such package need be installed.
CREDENTIALS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                      "UnauthenticatedError", "PermissionDeniedError"}


def is_credentials_error(error: BaseException) -> bool:
    refused = is_object_store_error(error) and http_status(error) == 401  # (gcsfs's 403 is an OSError "Forbidden")
    return refused or any(kind.__name__ in CREDENTIALS_ERRORS for kind in type(error).__mro__)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or is_credentials_error(error)


# obstore's errors that another attempt may mend (a network or server error; a task that died): its others are
# mistakes no retry fixes (an invalid path, an unknown setting). None of them is an OSError.
OBJECT_STORE_HICCUPS = {"GenericError", "JoinError"}


def is_object_store_error(error: BaseException) -> bool:
    """One of an object store client's own errors, which are no OSErrors: obstore's (Flyte 2 moves s3:// and gs://
    files with obstore, and makes it fsspec's handler of those schemes once imported), and gcsfs's HttpError (gs://
    under fsspec: an HTTP status it has no OSError for, such as 401 or a 503 that outlasted its own retries)."""
    return type(error).__module__.partition(".")[0] in ("obstore", "gcsfs")


def http_status(error: BaseException) -> int | None:
    """The HTTP status an object store client's error carries (gcsfs's HttpError.code), if any."""
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None


def is_storage_error(error: BaseException) -> bool:
    """A storage or network hiccup that another attempt may not meet (requests' errors are OSErrors too); not a
    missing file the user named, which a retry would not find either."""
    status = http_status(error) or 0
    store_hiccup = is_object_store_error(error) and (type(error).__name__ in OBJECT_STORE_HICCUPS
                                                     or status in (408, 429) or status >= 500)
    return (isinstance(error, OSError) or store_hiccup) and not is_user_error(error)


@contextlib.contextmanager
def location_named(location: str, field: str, owner: str):
    """A location (a checkpoint or folder URI, given as `owner.field`) that cannot be read (no credentials, no such
    bucket or host) fails in one line naming the field, where the store's error would name neither."""
    try:
        yield
    except Exception as error:
        if not (is_storage_error(error) or is_credentials_error(error) or is_object_store_error(error)):
            raise
        raise ConfigError(field, f"cannot read {location!r}: {user_message(error)}", owner) from None


def user_message(error: BaseException) -> str:
    """The error's one line for a person: an object store's first line (the rest is its debugging details), with
    a hint where credentials are missing."""
    message = str(error).strip().split("\n", 1)[0] if is_object_store_error(error) else str(error)
    if is_credentials_error(error):
        return (f"{message} for an object store URI (s3://, gs://): give this machine its credentials (AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)")
    return message


def user_error_names() -> set[str]:
    """The class names of every user error: an error that crossed a process boundary (Flyte 2 keeps only its class
    name, as the error's code) is known by its name alone."""
    names, kinds = set(CREDENTIALS_ERRORS), list(USER_ERRORS)
    while kinds:
        kind = kinds.pop()
        names.add(kind.__name__)
        kinds += kind.__subclasses__()
    return names


def reraise_user_errors(failure: Callable[[BaseException, str], BaseException]):
    """A decorator for a Flyte task's body: a user error leaving it is raised again as failure(error, its one line),
    the front's way of failing a task with that line, not retried. Other errors pass unchanged."""

    def raise_one_line(error: Exception) -> None:
        if is_user_error(error):
            raise failure(error, user_message(error)) from error

    def decorate(function):
        if inspect.iscoroutinefunction(function):  # a Flyte 2 driver that awaits its tasks (workflows/flyte2)
            @functools.wraps(function)
            async def run_async(*args, **kwargs):
                try:
                    return await function(*args, **kwargs)
                except Exception as error:
                    raise_one_line(error)
                    raise

            return run_async

        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                raise_one_line(error)
                raise

        return run

    return decorate
