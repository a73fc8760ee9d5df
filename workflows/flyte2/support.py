"""What the Flyte 2 tasks do for Flyte, around the nanochat_flyte functions they call: where a task writes what it
returns, its report tabs (the cards), which steps of a driver run at once, the one-line user errors, the intra-task
checkpoint a retried attempt resumes from, and the W&B console link.
"""

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

import flyte
import flyte.errors
import flyte.report
from flyte._persistence._task_cache import LocalTaskCache
from flyte.extend import TaskPluginRegistry
from flyte.io import Dir
from flyteplugins.pytorch.task import Elastic, TorchFunctionTask
from obstore.exceptions import GenericError
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from nanochat_flyte.errors import UserError, is_storage_error, is_user_error, reraise_user_errors, user_error_names
from nanochat_flyte.files import still_there
from nanochat_flyte.pipeline.train import packed_attempt, unpacked_attempt
from nanochat_flyte.reporting.tracking import RUN_ID_ENV, console_link_settings, stage_run_id


def is_local_run() -> bool:
    return flyte.ctx().mode == "local"


@contextlib.contextmanager
def said_at_exit_while_running(message: Callable[[], str | None]):
    """Ctrl-C under `flyte run --local` ends the process from its main thread while the task runs on a worker thread,
    which sees no KeyboardInterrupt: message(), unless None, is printed at the exit if the block is still running.
    The process then ends at once with status 130 (a shell's for Ctrl-C): finalizing the interpreter under the
    training thread aborts in C++ ("terminate called without an active exception", status 134)."""
    if not is_local_run():
        yield
        return

    def say() -> None:
        if text := message():
            print(text, flush=True)
        sys.stderr.flush()
        os._exit(130)  # after W&B's exit hook, which was registered later and so ran first

    atexit.register(say)
    try:
        yield
    finally:
        atexit.unregister(say)


def work_dir(name: str) -> Path:
    """A new directory for what a task returns as a Dir. Locally a Dir keeps the path it is given (nothing is copied),
    so it goes under the run's raw data path; on a cluster into local scratch, which Dir.from_local uploads."""
    if is_local_run():
        path = Path(flyte.ctx().raw_data_path.get_random_remote_path(name))
    else:
        path = Path(tempfile.mkdtemp(prefix="nanochat-")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_dir(directory: Dir) -> Path:
    """A Dir input as a local directory: downloaded on a cluster, used in place locally, where a folder named by hand
    may not be there: one line then says so."""
    path = Path(directory.download_sync())
    if is_local_run() and not path.exists():
        raise UserError(f"{path}: no such folder")
    return path


def local_files(literal) -> list[Path]:
    """The local files and folders (File, Dir) an output literal (flyteidl2's Literal) points to."""
    kind = literal.WhichOneof("value")
    if kind == "collection":
        return [path for item in literal.collection.literals for path in local_files(item)]
    if kind == "map":
        return [path for item in literal.map.literals.values() for path in local_files(item)]
    if kind != "scalar" or literal.scalar.WhichOneof("value") != "blob":
        return []
    uri = literal.scalar.blob.uri.removeprefix("file://")
    return [] if "://" in uri else [Path(uri)]


def cached_outputs_still_there(get):
    """An entry of Flyte's local cache (~/.flyte) whose files are gone is a miss, and the task runs again, as under
    pyflyte (workflows/support.py). (Flyte would hand the next task the missing folder.)"""

    async def get_if_there(cache_key: str):
        outputs = await get(cache_key)
        there = outputs is not None and still_there(
            (path for output in outputs.proto_outputs.literals for path in local_files(output.value)), "local cache")
        return outputs if there else None

    return staticmethod(get_if_there)


LocalTaskCache.get = cached_outputs_still_there(LocalTaskCache.get)


def upload(path: Path) -> Dir:
    return Dir.from_local_sync(path)


async def concurrently(*steps: Coroutine) -> list:
    """A driver's steps that need not wait for each other, each a task or a chain of them: at once on a cluster,
    where each task is a pod of its own, as flytekit runs a workflow's independent nodes, and as there the first
    failure stops the others (a cancelled task's action is aborted on the server, once awaited); one after another,
    in the order given, in a local run, where they would share the laptop's CPUs and its terminal."""
    if not is_local_run():
        running = [asyncio.ensure_future(step) for step in steps]
        try:
            return list(await asyncio.gather(*running))
        except BaseException:
            for step in running:
                step.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
    done = []
    try:
        for step in steps:
            done.append(await step)
    finally:
        for step in steps[len(done) + 1:]:  # after a failure: never started, closed unawaited without a warning
            step.close()
    return done


def show_report(title: str, html: str) -> None:
    """How a task shows a card: a tab of its report (nanochat_flyte.pipeline.Show)."""
    flyte.report.get_tab(title).replace(html)


# ---------------------------------------------------------------------- user errors


def not_retried(error: BaseException, message: str) -> Exception:
    """A user error fails the task with its one line, and is not retried; its code names it (ConfigError, ...)."""
    return flyte.errors.NonRecoverableError(message, code=type(error).__name__)


one_line_user_errors = reraise_user_errors(not_retried)


def is_user_error_raised(error: BaseException | None) -> bool:
    while error is not None:
        if is_user_error(error) or getattr(error, "code", None) in user_error_names():
            return True
        error = error.__cause__
    return False


class QuietUserErrors(logging.Filter):
    """Flyte logs a failed task's traceback, then that a non-recoverable error is not retried: for a user error, the
    one line that names it (the run's error) is all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_user_error_raised(record.exc_info[1]):
            return False
        return "raised a non-recoverable error" not in record.getMessage()


logging.getLogger("flyte").addFilter(QuietUserErrors())  # a logger's filters outlive the CLI's handler setup


def retried_only_on_storage_errors(task_function):
    """Flyte 2 retries a task after any error but NonRecoverableError; flytekit only after one raised as recoverable.
    Both fronts retry what another attempt can mend, a storage or network hiccup (and, the platform's own, a
    preempted node), and never a bug, which would fail every attempt alike (workflows/support.py,
    retried_on_storage_errors). User errors pass on to one_line_user_errors. On s3:// and gs:// Flyte 2 moves
    files with obstore, whose network and server errors (a reset connection, a timeout, a 5xx) are its
    GenericError, no OSError; its missing object or credentials are errors of their own, not retried."""

    @functools.wraps(task_function)
    def attempt(*args, **kwargs):
        try:
            return task_function(*args, **kwargs)
        except Exception as error:
            already_final = isinstance(error, flyte.errors.NonRecoverableError)
            storage_hiccup = is_storage_error(error) or isinstance(error, GenericError)
            if storage_hiccup or is_user_error_raised(error) or already_final:
                raise
            raise flyte.errors.NonRecoverableError(f"{type(error).__name__}: {error}",
                                                   code=type(error).__name__) from error

    return attempt


# ---------------------------------------------------------------------- torch elastic


@dataclass
class ElasticUserErrors(Elastic):
    """flyteplugins-pytorch's Elastic config, whose task fails in one line, without retries, when a worker failed
    with a user error: the plugin reports any worker's failure as a RuntimeError, which Flyte retries (on eight
    A100s), where v1's plugin fails with the user's error."""


class ElasticUserErrorsTask(TorchFunctionTask):
    async def execute(self, *args, **kwargs):
        try:
            return await super().execute(*args, **kwargs)
        except RuntimeError as error:
            message = worker_user_error(error.__cause__)
            if message is None:
                raise
            raise flyte.errors.NonRecoverableError(message) from error


def worker_user_error(failure: BaseException | None) -> str | None:
    """The one line of the first worker that failed with a user error (one_line_user_errors' NonRecoverableError),
    from torch elastic's record of its failure; None for any other failure."""
    if not isinstance(failure, ChildFailedError):
        return None
    for process in failure.failures.values():
        recorded = process.message  # the worker's error file: {"message": "Type: text", "extraInfo": ...}
        text = recorded.get("message", "") if isinstance(recorded, dict) else str(recorded or "")
        if text.startswith(f"{flyte.errors.NonRecoverableError.__name__}: "):
            return text.split(": ", 1)[1]
    return None


TaskPluginRegistry.register(config_type=ElasticUserErrors, plugin=ElasticUserErrorsTask)


# ---------------------------------------------------------------------- intra-task checkpoints

def attempt_owner() -> str:
    """The run and the action of this attempt: a local run gives all its tasks one checkpoint file, under its raw
    data path, which another run given the same --raw-data-path finds too. A task resumes only its own."""
    action = flyte.ctx().action
    return f"{action.run_name}/{action.name}"


class FlyteAttempts:
    """Flyte 2's intra-task checkpoint (flyte.ctx().checkpoint), where a retried attempt finds the previous attempt's
    last save (nanochat_flyte.pipeline.train.AttemptCheckpoint): one tar naming the run and action that made it
    (train.packed_attempt; load_sync unpacks any tar)."""

    def restore(self) -> Path | None:
        context = flyte.ctx()
        return unpacked_attempt(context.checkpoint.load_sync() if context.checkpoint else None, attempt_owner())

    def save(self, checkpoint_dir: Path) -> None:
        context = flyte.ctx()
        if context.checkpoint:
            with packed_attempt(checkpoint_dir, attempt_owner()) as archive:
                context.checkpoint.save_sync(archive)


# ---------------------------------------------------------------------- the W&B console link


@dataclass(frozen=True)
class WandbRunLink:
    """The console's "Weights & Biases" link (flyte.Link): to the run a training task of `stage` logs to, whose id is
    the Flyte run's name (name_wandb_run) as tracking.stage_run_id spells it. get_link is called at registration,
    with the run's name as a template the platform fills in."""

    host: str
    entity: str
    project: str
    stage: str = "base"
    name: str = "Weights & Biases"
    icon_uri: str = "https://wandb.ai/favicon.ico"

    def get_link(self, run_name: str, project: str, domain: str, context: dict, parent_action_name: str,
                 action_name: str, pod_name: str, **kwargs) -> str:
        return f"{self.host}/{self.entity}/{self.project}/runs/{stage_run_id(run_name, self.stage)}"


def wandb_links(stage: str = "base") -> tuple[WandbRunLink, ...]:
    """The link, where NANOCHAT_WANDB_ENTITY was set at registration (tracking.console_link_settings)."""
    settings = console_link_settings()
    return (WandbRunLink(**settings, stage=stage),) if settings else ()


def name_wandb_run() -> None:
    """The W&B run of a training task on a cluster is named after the Flyte run, as the console link expects (a local
    run's is random, as under pyflyte)."""
    if not is_local_run():
        os.environ[RUN_ID_ENV] = flyte.ctx().action.run_name
