"""The training tasks: pretraining, SFT and RL on the shared training loop, each into the checkpoint directory its
front gives it, with its Training card.

A Flyte task attempt can be preempted (spot GPUs) and retried. Every save of the training loop also goes to the
front's intra-task checkpoint, and a retried attempt starts from the last one: it loses at most save_every steps.
"""

import contextlib
import io
import os
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.files import local_path
from nanochat_flyte.model.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, checkpoint_run_config, fetch_checkpoint
from nanochat_flyte.pipeline import Show
from nanochat_flyte.reporting.report import training_deck_html
from nanochat_flyte.training.loop import distributed_env
from nanochat_flyte.training.pretrain import train
from nanochat_flyte.training.rl import train_rl
from nanochat_flyte.training.sft import train_chat


class AttemptCheckpoint(Protocol):
    """Where a front keeps a task attempt's last save for the next attempt (flytekit's or Flyte 2's intra-task
    checkpoint)."""

    def restore(self) -> Path | None:
        """The previous attempt's last save, as a local directory; None on a first attempt."""

    def save(self, checkpoint_dir: Path) -> None:
        """Keep checkpoint_dir for the next attempt."""


# A front whose intra-task checkpoint is one file for every task of a run (Flyte 2's, locally) keeps a save as one
# tar that names the task attempt's owner: another task, or another run given the same storage, never resumes it.
OWNER_FILE = ".nanochat_attempt_owner"


@contextlib.contextmanager
def packed_attempt(checkpoint_dir: Path, owner: str):
    """checkpoint_dir as one uncompressed tar (weights do not compress) holding OWNER_FILE with `owner`: yields its
    path, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="nanochat-attempt-") as scratch:
        archive = Path(scratch) / "checkpoint.tar"
        with tarfile.open(archive, "w") as tar:
            for child in sorted(checkpoint_dir.iterdir()):
                if child.name != OWNER_FILE:
                    tar.add(child, arcname=child.name)
            info = tarfile.TarInfo(OWNER_FILE)
            info.size = len(owner.encode())
            tar.addfile(info, io.BytesIO(owner.encode()))
        yield archive


def unpacked_attempt(restored: Path | None, owner: str) -> Path | None:
    """A save that packed_attempt made, unpacked into `restored`: the directory (OWNER_FILE removed, so that it holds
    the run's files only) when `owner` made it; None when there is none, or someone else's."""
    owner_file = restored / OWNER_FILE if restored is not None else None
    if owner_file is None or not owner_file.is_file() or owner_file.read_text() != owner:
        return None
    owner_file.unlink()
    return restored


def resume_previous_attempt(attempts: AttemptCheckpoint, checkpoint_dir: Path) -> Path | None:
    """The previous attempt's save, copied into checkpoint_dir and saved again at once: Flyte hands an attempt only
    the save of the attempt before it, so a second preemption before the first save would lose it."""
    restored = attempts.restore()
    if not restored or not (Path(restored) / CHECKPOINT_FILE).exists():
        return None
    shutil.copytree(restored, checkpoint_dir, dirs_exist_ok=True)
    if distributed_env()[0] == 0:  # under torch elastic every rank restores; one saves
        attempts.save(checkpoint_dir)
    print(f"resuming from the previous attempt's checkpoint ({restored})", flush=True)
    return checkpoint_dir


def resumed_dir(attempts: AttemptCheckpoint, checkpoint_dir: Path, resume_from: str) -> Path | None:
    """What a training task continues: the previous attempt's save, else the checkpoint `resume_from` (a directory
    or URI, fetched beside checkpoint_dir), else nothing."""
    resume_dir = resume_previous_attempt(attempts, checkpoint_dir)
    if resume_dir is None and resume_from:
        resume_dir = fetch_checkpoint(resume_from, checkpoint_dir.with_name("resume_from"))
        print(f"resuming from {resume_from}", flush=True)
    return resume_dir


def last_save(config: RunConfig | ChatConfig | RLConfig, checkpoint_dir: Path) -> Path | None:
    """Where an interrupted run's last checkpoint is on this machine, to resume from: a local save_to copy (the
    task's own folder may go with it), else checkpoint_dir; None before the first save. Named from the working
    directory where it is below it (`runs/base`, as the run's other lines name it)."""
    saved = (local_path(config.save_to) if config.save_to else None) or checkpoint_dir
    if not (saved / CHECKPOINT_FILE).exists():
        return None
    return Path(os.path.relpath(saved)) if saved.is_relative_to(Path.cwd()) else saved


def resume_command(config: RunConfig, checkpoint_dir: Path, run_command: str, pipelines_file: str) -> str | None:
    """The lines that say how to continue an interrupted pretraining run from its last save (last_save), given the
    front's command up to its inputs and the file of its whole pipelines (which take the same inputs); None before
    the first save."""
    saved = last_save(config, checkpoint_dir)
    if saved is None:
        return None
    inputs = f"--config {shlex.quote(str(saved / CONFIG_FILE))} --resume_from {shlex.quote(str(saved))}"
    return f"resume with: {run_command} {inputs}\n(a pipeline of {pipelines_file}: its command with {inputs})"


def stage_resume_command(config: ChatConfig | RLConfig, checkpoint_dir: Path, run_command: str,
                         start_checkpoint: str) -> str | None:
    """The line that says how to continue an interrupted SFT or RL run from its last save: the front's command
    (`pyflyte run workflows/chat.py`) with the stage's workflow (chat_sft, chat_rl), from the same start checkpoint;
    None before the first save."""
    saved = last_save(config, checkpoint_dir)
    if saved is None:
        return None
    workflow, start_flag = ("chat_rl", "--sft_checkpoint") if isinstance(config, RLConfig) else (
        "chat_sft", "--base_checkpoint")
    return (f"resume with: {run_command} {workflow} {start_flag} {shlex.quote(start_checkpoint)} --resume_from "
            f"{shlex.quote(str(saved))}, and the same --config")


def base_model(config: RunConfig, data_dir: Path, checkpoint_dir: Path, environment: dict, resume_from: str,
               attempts: AttemptCheckpoint, show: Show) -> dict:
    """Pretrain into checkpoint_dir, continuing (in this order) the previous attempt, the checkpoint `resume_from`
    (a directory or URI), or nothing. Returns the training summary."""
    summary = train(config, data_dir, checkpoint_dir, resume_dir=resumed_dir(attempts, checkpoint_dir, resume_from),
                    on_save=attempts.save, env_report=environment)
    show("Training", training_deck_html(checkpoint_dir, config, environment, summary))
    return summary


def chat_stage(config: ChatConfig | RLConfig, start_dir: Path, data_dir: Path, checkpoint_dir: Path,
               environment: dict, resume_from: str, attempts: AttemptCheckpoint, show: Show) -> dict:
    """SFT of the base checkpoint in start_dir (a ChatConfig) or RL of the chat one (an RLConfig), on the data
    prepared for it in data_dir, into checkpoint_dir, continuing (in this order) the previous attempt, the stage's
    checkpoint `resume_from`, or nothing. Its card shows the run config its training loop ran with."""
    rl = isinstance(config, RLConfig)
    summary = (train_rl if rl else train_chat)(config, start_dir, data_dir, checkpoint_dir,
                                               resume_dir=resumed_dir(attempts, checkpoint_dir, resume_from),
                                               on_save=attempts.save, env_report=environment)
    run_config = checkpoint_run_config(checkpoint_dir)
    show("Reinforcement learning" if rl else "Fine-tuning",
         training_deck_html(checkpoint_dir, run_config, environment, summary))
    return summary
