"""What the flytekit workflows share, besides their tasks: the secrets, the machines, the one-line user errors, the
intra-task checkpoints that let a retried attempt resume, and the W&B console link.
"""

import contextlib
import functools
import os
import shutil
from pathlib import Path

import click
import requests
from flytekit import FlyteContextManager, Resources, Secret, current_context
from flytekit.configuration.plugin import get_plugin
from flytekit.core.utils import ClassDecorator
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.extras.accelerators import T4
from flytekit.interaction.click_types import JsonParamType
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.errors import is_user_error, user_message
from nanochat_flyte.training.loop import distributed_env
from workflows.image import IMAGE


# Secrets, with names that can be changed at registration time without editing code
# ($NANOCHAT_<NAME>_SECRET_GROUP / _KEY). Open-source Flyte names a secret by group and key: the Kubernetes secret
# `wandb` with the key `api_key`. Union names it by its key alone: `union create secret wandb_api_key`. Locally,
# flytekit reads either default from the environment as GROUP_KEY in upper case: $WANDB_API_KEY, $HF_TOKEN.
SECRET_NEEDS_GROUP = get_plugin().secret_requires_group()  # False when the `union` package is installed


def declared_secret(name: str, group: str, key: str) -> Secret:
    return Secret(
        group=os.environ.get(f"NANOCHAT_{name}_SECRET_GROUP", group if SECRET_NEEDS_GROUP else "") or None,
        key=os.environ.get(f"NANOCHAT_{name}_SECRET_KEY", key if SECRET_NEEDS_GROUP else f"{group}_{key}"),
    )


WANDB_SECRET = declared_secret("WANDB", "wandb", "api_key")  # absent: W&B runs offline

HF_SECRET = declared_secret("HF", "hf", "token")  # only for a gated or private mirror of the dataset


class wandb_console_link(ClassDecorator):  # noqa: N801 - used as a decorator, like flytekit's own
    """Gives the task a "Weights & Biases" link in the Flyte/Union console, to the run named after the execution
    (the Tracker's run id). Needs the cluster's `wandb-execution-id` dynamic log link (docs/observability.md)
    and, at registration, NANOCHAT_WANDB_ENTITY (and NANOCHAT_WANDB_PROJECT / NANOCHAT_WANDB_HOST where they differ
    from "nanochat" / https://wandb.ai)."""

    def execute(self, *args, **kwargs):
        return self.task_function(*args, **kwargs)

    def get_extra_config(self) -> dict[str, str]:
        entity = os.environ.get("NANOCHAT_WANDB_ENTITY", "")
        if not entity:  # the link's URL is host/entity/project/runs/<execution>: no entity, no link
            return {}
        return {self.LINK_TYPE_KEY: "wandb-execution-id", "entity": entity,
                "host": os.environ.get("NANOCHAT_WANDB_HOST", "https://wandb.ai"),
                "project": os.environ.get("NANOCHAT_WANDB_PROJECT", "nanochat")}


class TaskInputError(click.ClickException):
    """A mistake in the run's inputs, raised from a task: on a cluster it fails the task, not retried."""


def one_line_user_errors(task_function):
    """Our user errors (a bad config field, an unreachable URL, a missing checkpoint) leave the task as one line.
    In a local `pyflyte run` that line is printed as it is, copyable (pyflyte would box a ClickException and wrap it
    at 80 columns, splitting URLs), and the command exits with status 2; elsewhere it is a TaskInputError."""

    @functools.wraps(task_function)
    def run(*args, **kwargs):
        try:
            return task_function(*args, **kwargs)
        except Exception as error:
            if not is_user_error(error):
                raise
            if is_local_run() and click.get_current_context(silent=True) is not None:
                click.echo(f"Error: {user_message(error)}", err=True)
                raise click.exceptions.Exit(2) from None
            raise TaskInputError(user_message(error)) from error

    return run


def name_missing_preset_files() -> None:
    """`pyflyte run ... --config PATH` reads PATH when it exists and parses anything else as inline JSON, so a
    misspelt preset path was reported as invalid JSON. A value that names a .yaml/.yml/.json file that is not there
    now says so, before anything runs."""
    parse = JsonParamType._parse

    def parse_naming_missing_files(self, value, param):
        if isinstance(value, str) and value.strip().endswith((".yaml", ".yml", ".json")) and not os.path.exists(value):
            raise click.BadParameter(f"no preset file {value!r} (give a YAML or JSON file that exists, or inline JSON)")
        return parse(self, value, param)

    JsonParamType._parse = parse_naming_missing_files


name_missing_preset_files()


def is_local_run() -> bool:
    return FlyteContextManager.current_context().execution_state.is_local_execution()


def export_secret(secret: Secret, env_var: str) -> None:
    """Put a Flyte secret into the environment variable the library reads; a missing secret is no error."""
    try:
        value = current_context().secrets.get(secret.group, secret.key)
    except ValueError:
        return
    os.environ[env_var] = value


# What the reference run used: one T4 with 8 CPUs and 32 GiB. Disk: ~6 GB of tokens for 50 shards, ~1 GB per
# checkpoint (kept twice: ours and Flyte's copy) and torch.compile's cache; 50Gi fits a 100 GB node disk.
# Limits equal requests: a Guaranteed pod is the last to be evicted. shared_memory=True mounts a /dev/shm as
# large as the memory limit (a container's default is 64 MB): torch multiprocessing and NCCL under DDP use it.
TRAINING_RESOURCES = dict(
    requests=Resources(cpu="8", mem="32Gi", gpu="1", ephemeral_storage="50Gi"),
    limits=Resources(cpu="8", mem="32Gi", gpu="1", ephemeral_storage="50Gi"),
    accelerator=T4,
    shared_memory=True,
)

DATA_RESOURCES = Resources(cpu="4", mem="8Gi", ephemeral_storage="20Gi")


def restore_flyte_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Resume from the previous attempt's save, and save it again at once: Flyte only keeps attempt - 1's."""
    flyte_checkpoint = current_context().checkpoint
    restored = flyte_checkpoint.restore() if flyte_checkpoint else None
    if not restored or not (Path(restored) / "checkpoint.pt").exists():
        return None
    shutil.copytree(restored, checkpoint_dir, dirs_exist_ok=True)
    if distributed_env()[0] == 0:  # under torch elastic every rank restores; one re-saves
        flyte_checkpoint.save(checkpoint_dir)
    print(f"resuming from the previous attempt's checkpoint ({restored})", flush=True)
    return checkpoint_dir


def save_flyte_checkpoint(checkpoint_dir: Path) -> None:
    """Upload the intra-task checkpoint, for a retry of this task to resume from. A local run is never retried:
    it skips the copy (which would double the checkpoint's disk use for nothing)."""
    flyte_checkpoint = current_context().checkpoint
    if flyte_checkpoint and not is_local_run():
        flyte_checkpoint.save(checkpoint_dir)


@contextlib.contextmanager
def retried_on_storage_errors():
    """A storage or network hiccup fails a training attempt as recoverable: Flyte retries it, and the retry resumes
    from the intra-task checkpoint."""
    try:
        yield
    except (OSError, requests.RequestException) as error:
        raise FlyteRecoverableException(f"{type(error).__name__}: {error}") from error


# How every training task (pretraining, SFT) is declared. Interruptible: a spot T4 is a third of the price; a
# preempted attempt resumes from the intra-task checkpoint.
TRAINING_TASK = dict(container_image=IMAGE, secret_requests=[WANDB_SECRET], interruptible=True, retries=3,
                     enable_deck=True, **TRAINING_RESOURCES)


def checkpoint_location(directory: FlyteDirectory) -> str:
    """Where a checkpoint directory input lives (its URI on a cluster, its path locally): small files of it are read
    from there without downloading the weights."""
    return directory.remote_source or directory.path
