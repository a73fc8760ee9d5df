"""What the flytekit workflows share, besides their tasks: the secrets, the machines, the one-line user errors, the
intra-task checkpoints that let a retried attempt resume, the cards (Decks) and the W&B console link.
"""

import contextlib
import json
import os
from pathlib import Path

import click
from flytekit import Deck, FlyteContextManager, Resources, Secret, current_context
from flytekit.configuration.plugin import get_plugin
from flytekit.core.local_cache import LocalTaskCache
from flytekit.core.utils import ClassDecorator
from flytekit.exceptions.system import FlyteDownloadDataException
from flytekit.exceptions.user import FlyteDataNotFoundException, FlyteRecoverableException
from flytekit.extras.accelerators import A100, T4
from flytekit.interaction.click_types import JsonParamType
from flytekit.models.literals import Literal, LiteralMap
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.errors import ConfigError, is_storage_error, is_user_error, reraise_user_errors
from nanochat_flyte.files import still_there
from nanochat_flyte.pipeline import secrets
from nanochat_flyte.pipeline.secrets import SecretName
from nanochat_flyte.reporting.tracking import console_link_settings
from nanochat_flyte.schema import cli_config_class
from workflows.image import IMAGE
from workflows.presets import DATA_NODE, DRIVER_NODE, REGISTERED_SETTINGS, T4_NODE, Machine

# The secrets, named as nanochat_flyte.pipeline.secrets says: by group and key on open-source Flyte (the Kubernetes
# secret `wandb` with the key `api_key`), by key alone on Union (`union create secret wandb_api_key`). Locally,
# flytekit reads either default from the environment as GROUP_KEY in upper case: $WANDB_API_KEY, $HF_TOKEN.
SECRET_NEEDS_GROUP = get_plugin().secret_requires_group()  # False when the `union` package is installed


def declared_secret(secret: SecretName) -> Secret:
    group, key = secret.group_and_key(SECRET_NEEDS_GROUP)
    return Secret(group=group, key=key)


def with_secrets(*requested: Secret) -> dict:
    """@task arguments that request these secrets (or none), with the settings the tasks were registered with
    (presets.REGISTERED_SETTINGS: a task's pod declares the secrets again under those names, to look them up with
    export_secret). Every task takes them, whether or not it reads a secret today."""
    return dict(secret_requests=list(requested), environment=REGISTERED_SETTINGS)


WANDB_SECRET = declared_secret(secrets.WANDB)  # absent: W&B runs offline

HF_SECRET = declared_secret(secrets.HF)  # only for a gated or private mirror of the dataset


class wandb_console_link(ClassDecorator):  # noqa: N801 - used as a decorator, like flytekit's own
    """Gives the task a "Weights & Biases" link in the Flyte/Union console, to the run named after the execution
    (tracking.stage_run_id, the Tracker's run id). Needs the cluster's dynamic log links (docs/observability.md)
    and, at registration, NANOCHAT_WANDB_ENTITY (tracking.console_link_settings).

    @wandb_console_link: pretraining's run, <execution> (the `wandb-execution-id` link).
    @wandb_console_link(stage="chat"): a later stage's run, <execution>-<stage> (the `wandb-execution-id-stage`
    link: the cluster fills in only values that are not empty, so the base run's link cannot share its template)."""

    def execute(self, *args, **kwargs):
        return self.task_function(*args, **kwargs)

    def get_extra_config(self) -> dict[str, str]:
        settings = console_link_settings()
        if not settings:
            return {}
        stage = self.decorator_kwargs.get("stage")
        link = {self.LINK_TYPE_KEY: "wandb-execution-id-stage", "stage": stage} if stage else {
            self.LINK_TYPE_KEY: "wandb-execution-id"}
        return {**link, **settings}


class TaskInputError(click.ClickException):
    """A mistake in the run's inputs, raised from a task: on a cluster it fails the task, not retried."""


def task_input_error(error: BaseException, message: str) -> Exception:
    """In a local `pyflyte run` the line is printed as it is, copyable (pyflyte would box a ClickException and wrap
    it at 80 columns, splitting URLs), and the command exits with status 2; elsewhere it is a TaskInputError."""
    if is_local_run() and click.get_current_context(silent=True) is not None:
        click.echo(f"Error: {message}", err=True)
        return click.exceptions.Exit(2)
    return TaskInputError(message)


# Our user errors (a bad config field, an unreachable URL, a missing checkpoint) leave a task as one line.
one_line_user_errors = reraise_user_errors(task_input_error)


def read_configs_as_the_library_does(convert):
    """`pyflyte run --config VALUE` for our configs: StrictConfig.from_cli_value, as `flyte run` reads it. flytekit
    would read a preset file with PyYAML's YAML 1.1 reader (`run_name: yes` is True, a malformed file a traceback),
    report a misspelt preset path as invalid JSON, and fill the fields a partial config leaves out from the class's
    defaults instead of the workflow's default input (nanochat_d12_a100's depth-12 preset)."""

    def convert_config(self, value, param, ctx):
        kind = cli_config_class(self._python_type, value)
        if kind is None:
            return convert(self, value, param, ctx)
        default = getattr(param, "default", None)  # the workflow's default input, as pyflyte's JSON
        try:
            return kind.from_cli_value(value, json.loads(default) if isinstance(default, str) else None)
        except ConfigError as error:
            raise click.BadParameter(str(error)) from error

    return convert_config


JsonParamType.convert = read_configs_as_the_library_does(JsonParamType.convert)


def local_files(literal: Literal) -> list[Path]:
    """The local files and folders (FlyteFile, FlyteDirectory) an output literal points to."""
    if literal.collection is not None:
        return [path for item in literal.collection.literals for path in local_files(item)]
    if literal.map is not None:
        return [path for item in literal.map.literals.values() for path in local_files(item)]
    blob = literal.scalar.blob if literal.scalar is not None else None
    if blob is None or "://" in blob.uri.removeprefix("file://"):
        return []
    return [Path(blob.uri.removeprefix("file://"))]


def cached_outputs_still_there(get):
    """flytekit's local cache outlives the folders under $TMPDIR its outputs are in (a reboot, a clean-up): an entry
    whose files are gone is a miss, and the task runs again. (flytekit would hand the next task the missing folder,
    and stop with a traceback in its input conversion.)"""

    def get_if_there(task_name: str, cache_version: str, inputs: LiteralMap, ignored: tuple) -> LiteralMap | None:
        outputs = get(task_name, cache_version, inputs, ignored)
        there = outputs is not None and still_there(
            (path for literal in outputs.literals.values() for path in local_files(literal)), task_name)
        return outputs if there else None

    return staticmethod(get_if_there)


LocalTaskCache.get = cached_outputs_still_there(LocalTaskCache.get)


def deck(title: str, html: str) -> None:
    """How a task shows a card: a Deck (nanochat_flyte.pipeline.Show)."""
    Deck(title, html)


def is_local_run() -> bool:
    return FlyteContextManager.current_context().execution_state.is_local_execution()


def export_secret(secret: SecretName) -> None:
    """Put a Flyte secret into the environment variable the library reads; a missing secret is no error."""
    declared = declared_secret(secret)
    try:
        value = current_context().secrets.get(declared.group, declared.key)
    except ValueError:
        return
    os.environ[secret.env_var] = value


ACCELERATORS = {"T4": T4, "A100": A100}  # presets.Machine.gpu as flytekit's accelerator


def task_resources(machine: Machine) -> dict:
    """A machine as flytekit's @task (and with_overrides) arguments."""
    resources = Resources(cpu=str(machine.cpu), mem=machine.memory, ephemeral_storage=machine.disk,
                          gpu=str(machine.gpus) if machine.gpus else None)
    if not machine.gpus:
        return dict(requests=resources)
    return dict(requests=resources, limits=resources, accelerator=ACCELERATORS[machine.gpu], shared_memory=True)


TRAINING_RESOURCES = task_resources(T4_NODE)
DATA_RESOURCES = task_resources(DATA_NODE)
DRIVER_RESOURCES = task_resources(DRIVER_NODE)  # the checks and the results


class FlytekitAttempts:
    """flytekit's intra-task checkpoint, where a retried attempt finds the previous attempt's last save
    (nanochat_flyte.pipeline.train.AttemptCheckpoint)."""

    def restore(self) -> Path | None:
        flyte_checkpoint = current_context().checkpoint
        if not flyte_checkpoint:
            return None
        try:
            restored = flyte_checkpoint.restore()
        except FlyteDataNotFoundException:  # the previous attempt ended before its first save: Flyte names its
            return None  # checkpoint prefix all the same, and there is nothing under it
        return Path(restored) if restored else None

    def save(self, checkpoint_dir: Path) -> None:
        """A local run is never retried: it skips the copy (which would double the checkpoint's disk use)."""
        flyte_checkpoint = current_context().checkpoint
        if flyte_checkpoint and not is_local_run():
            flyte_checkpoint.save(checkpoint_dir)


@contextlib.contextmanager
def retried_on_storage_errors():
    """A storage or network hiccup fails a training attempt as recoverable: Flyte retries it, and the retry resumes
    from the intra-task checkpoint. flytekit reports a failed download of an input (or of the previous attempt's
    checkpoint) as a FlyteDownloadDataException, no OSError, raised while handling the store's error: retried as
    well, unless that error is the user's (credentials; a missing object is FlyteDataNotFoundException)."""
    try:
        yield
    except (OSError, FlyteDownloadDataException) as error:
        if isinstance(error, OSError) and not is_storage_error(error):
            raise
        if isinstance(error, FlyteDownloadDataException) and is_user_error(error.__context__):
            raise
        raise FlyteRecoverableException(f"{type(error).__name__}: {error}") from error


# How every training task (pretraining, SFT, RL) is declared. Interruptible: a spot T4 is a third of the price; a
# preempted attempt resumes from the intra-task checkpoint.
# the HF token too: with core_metric_every, pretraining reads the CORE bundle, which may be on a gated mirror
TRAINING_TASK = dict(container_image=IMAGE, **with_secrets(WANDB_SECRET, HF_SECRET), interruptible=True, retries=3,
                     enable_deck=True, **TRAINING_RESOURCES)


def checkpoint_location(directory: FlyteDirectory) -> str:
    """Where a checkpoint directory input lives (its URI on a cluster, its path locally): small files of it are read
    from there without downloading the weights."""
    return directory.remote_source or directory.path
