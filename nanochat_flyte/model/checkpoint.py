"""The checkpoint directory (docs/architecture.md): save and restore the full training state, load for inference.

checkpoint.pt holds everything a resumed run needs to continue on the exact same loss curve: weights,
optimizer and grad-scaler state, every RNG, the data loader position, the step and the loop's own state.
It holds only tensors and plain Python values, so it loads with torch.load(weights_only=True): loading a
checkpoint from a remote URI never runs code from it.
"""

import json
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.tokenizer import load_tokenizer
from nanochat_flyte.errors import ConfigError, UserError, is_credentials_error, is_object_store_error, user_message
from nanochat_flyte.files import filesystem, local_path, write_atomically, write_json
from nanochat_flyte.model.gpt import GPT, GPTConfig

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_CONFIG_FILE = "model_config.json"
TRAINING_STATE_FILE = "training_state.json"
CONFIG_FILE = "config.json"  # the run's config as `pyflyte run ... --config` and `train --config` take it
TOKENIZER_DIR = "tokenizer"
# What load_model fetches of a remote checkpoint (training_state.json, which holds the phase, where there is one)
INFERENCE_FILES = (CHECKPOINT_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR, TRAINING_STATE_FILE)


class CheckpointError(UserError):
    """A checkpoint file that cannot be read whole."""


def cut_short(path: str | Path, size: str = "") -> str:
    """What is wrong with a checkpoint.pt that is no whole zip (size: " (N bytes)", where known), and what to do."""
    return f"{path} is cut short or damaged{size}: not a whole checkpoint; use another copy of the run (its save_to)"


# ---------------------------------------------------------------------- RNG states


# Python's global `random` is neither saved nor restored: this code draws only from random.Random(seed) instances, and
# a restored global state makes the "random" names other libraries draw from it repeat (Flyte 2's local mode names
# output folders so: a checkpoint resumed twice drew the same folders, and the second run failed on them).
def rng_states() -> dict:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available():
        # one state per GPU the saving process saw: a run resumed on fewer GPUs restores those it has
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


# ---------------------------------------------------------------------- training state


def save_checkpoint(out_dir: Path, *, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    grad_scaler: torch.amp.GradScaler | None, loader_state: dict, loop_state: dict,
                    config: dict, model_config: GPTConfig) -> Path:
    """Write checkpoint.pt and model_config.json into out_dir. `model` is the bare model (not compiled or DDP)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "rng": rng_states(),
        "loader": loader_state,
        "loop": loop_state,
        "config": config,
        "model_config": model_config.to_dict(),
    }
    write_atomically(out_dir / CHECKPOINT_FILE, lambda temp: torch.save(state, temp))
    write_json(out_dir / MODEL_CONFIG_FILE, model_config.to_dict())
    return out_dir / CHECKPOINT_FILE


def load_checkpoint(checkpoint_dir: Path) -> dict:
    """The saved state, on the CPU: RNG states must be CPU tensors, and load_state_dict() moves the weights and
    optimizer states to wherever the model lives."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {checkpoint_dir}: nothing to resume from")
    return read_checkpoint_file(path)


def read_checkpoint_file(path: Path, **options) -> dict:
    """torch.load of a checkpoint.pt; a file cut short (a crash or a full disk mid-copy) is one line naming it."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip, whose directory is at its end: gone when cut short
        raise CheckpointError(cut_short(path, f" ({path.stat().st_size:,} bytes)"))
    return torch.load(path, map_location="cpu", weights_only=True, **options)


# ---------------------------------------------------------------------- copies elsewhere


def same_location(first: str, second: str) -> bool:
    """Whether two checkpoint locations (directories or URIs) name the same place."""
    local_first, local_second = local_path(first), local_path(second)
    if local_first is not None and local_second is not None:
        return local_first.resolve() == local_second.resolve()
    return first.rstrip("/") == second.rstrip("/")


def check_save_to_apart(target: str, start: str, start_field: str, owner: str) -> None:
    """A stage's save_to must not hold a checkpoint it depends on (`start`, named as start_field): its first copy
    would replace that model."""
    if target and start and same_location(target, start):
        raise ConfigError("save_to", f"{target!r} holds the {start_field}: this run's copies would replace it; choose "
                                     "another save_to", owner)


def check_save_to(target: str, owner: str, remote: bool = False, continues: str = "") -> None:
    """Fail in one line, before any training, when save_to cannot be written: the first copy comes save_every steps
    into the run. A folder is made and written in; a URI's store gets a probe object, written and deleted (each rank
    its own). remote: the run's tasks are pods on a cluster, where a local folder is a pod's own disk, gone with it.
    A save_to that holds a checkpoint must hold the run this one continues (continues: its run_name; "" for a new
    run): the first copy would replace any other model there."""
    if not target:
        return
    check_writable(target, owner, remote)
    try:
        saved = read_checkpoint_json(target, TRAINING_STATE_FILE)
    except CheckpointError:  # a copy cut short, or a file not ours: nothing to continue, and not to be replaced
        raise ConfigError("save_to", f"{target!r} holds a damaged {TRAINING_STATE_FILE}: choose another save_to",
                          owner) from None
    if saved is not None and (not continues or saved.get("run_name") != continues):
        run = f"run {saved.get('run_name')!r}, {saved.get('status')} at step {saved.get('steps_completed')}"
        raise ConfigError("save_to", f"{target!r} holds the checkpoint of another {run}: this run's copies would "
                                     "replace it; choose another save_to (only a run resumed from that checkpoint "
                                     "writes there)", owner)


def check_writable(target: str, owner: str, remote: bool) -> None:
    """save_to can be written: a local folder (not on a cluster), or a URI's store."""
    if remote and local_path(target) is not None:
        raise ConfigError("save_to", f"{target!r} is a folder on the task's own disk, which goes with its pod on a "
                                     "cluster: give an object store URI (s3://, gs://, ...)", owner)
    try:
        if (directory := local_path(target)) is not None:
            directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
            return
        store, root = filesystem(target)
        probe = f"{root.rstrip('/')}/.nanochat_write_probe_{uuid.uuid4().hex}"
        store.pipe_file(probe, b"")
        store.rm_file(probe)
    except UserError as error:  # (a scheme fsspec does not know: the message names the URI)
        raise ConfigError("save_to", str(error), owner) from None
    except Exception as error:  # a store's own errors (no credentials, no bucket, no such host) are not all OSErrors
        if not (isinstance(error, OSError) or is_object_store_error(error) or is_credentials_error(error)):
            raise
        problem = error.strerror if isinstance(error, OSError) and error.strerror else user_message(error)
        raise ConfigError("save_to", f"cannot write to {target!r}: {problem}", owner) from None


def publish_checkpoint(checkpoint_dir: Path, target: str, weights: bool = True) -> None:
    """Copy the checkpoint directory to `target`, a local directory or any fsspec URI (s3://, gs://, ...). Every
    file lands whole: locally through a temp file and a rename; object stores write an object at once. checkpoint.pt
    comes after the files that describe it, and training_state.json, which says which step it is of, last: a copy
    stopped midway never claims a step its weights have not reached. weights=False: all but checkpoint.pt (copied
    already; what describes the run has changed since)."""
    last = {CHECKPOINT_FILE: 1, TRAINING_STATE_FILE: 2}  # the weights, then what says which step they are of
    files = sorted((path for path in Path(checkpoint_dir).rglob("*") if path.is_file()
                    and (weights or path != Path(checkpoint_dir) / CHECKPOINT_FILE)),
                   key=lambda path: last.get(path.name, 0) if path.parent == Path(checkpoint_dir) else 0)
    if (directory := local_path(target)) is not None:
        for path in files:
            destination = directory / path.relative_to(checkpoint_dir)
            destination.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(destination, lambda temp, source=path: shutil.copyfile(source, temp))
        return
    store, root = filesystem(target)
    for path in files:
        store.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(checkpoint_dir).as_posix()}")


def require_checkpoint(source: str | Path) -> None:
    """FileNotFoundError in one line unless the directory (local path or fsspec URI) holds a checkpoint: a check
    that reads no weights, for commands that have other things to fetch first."""
    store, root = filesystem(source)
    # exists(), not isfile(): an object store without credentials raises from exists() (one line), isfile() says no
    if not store.exists(f"{root.rstrip('/')}/{CHECKPOINT_FILE}"):
        raise FileNotFoundError(f"no {CHECKPOINT_FILE} in {source}: not a checkpoint directory")


def check_weights_whole(source: str | Path, field: str, owner: str) -> None:
    """checkpoint.pt of a checkpoint (a directory or URI) is there and whole, read from the zip directory at its end
    (a few KB, not the weights): a stage that starts from it fails in one line before it downloads or prepares
    anything, not when it loads the weights."""
    store, root = filesystem(source)
    path = f"{root.rstrip('/')}/{CHECKPOINT_FILE}"
    if not store.exists(path):
        raise ConfigError(field, f"{source} holds no {CHECKPOINT_FILE}: not a whole checkpoint", owner)
    with store.open(path, "rb") as file:
        whole = zipfile.is_zipfile(file)
    if not whole:
        raise ConfigError(field, cut_short(f"{str(source).rstrip('/')}/{CHECKPOINT_FILE}"), owner)


def fetch_checkpoint(source: str | Path, local_dir: Path, names: tuple[str, ...] | None = None) -> Path:
    """A checkpoint directory (local path or fsspec URI) as a local directory: local paths are used in place,
    remote ones are downloaded into local_dir: all of it, or only the files and folders in `names` that it has."""
    require_checkpoint(source)
    if (directory := local_path(source)) is not None:
        return directory
    store, root = filesystem(source)
    root = root.rstrip("/")
    if names is None:
        store.get(f"{root}/", str(local_dir), recursive=True)
    for name in names or ():
        if store.exists(f"{root}/{name}"):
            store.get(f"{root}/{name}", str(Path(local_dir) / name), recursive=True)
    return Path(local_dir)


def read_checkpoint_json(source: str | Path, name: str) -> dict | None:
    """One small JSON file of a checkpoint directory (local or fsspec URI), without fetching the weights; None if
    the checkpoint has no such file."""
    store, root = filesystem(source)
    path = f"{root.rstrip('/')}/{name}"
    if not store.exists(path):
        return None
    with store.open(path, "r") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:  # cut short by a crash mid-copy, or not ours
            raise CheckpointError(f"{path} is damaged ({error}): not a whole checkpoint; use another copy of "
                                  "the run (its save_to)") from None


# ---------------------------------------------------------------------- inference


@dataclass
class LoadedModel:
    model: GPT  # in eval mode, on the device it was loaded to
    tokenizer: tiktoken.Encoding
    config: GPTConfig
    phase: str  # "base" (continues text) or "chat" (fine-tuned on conversations)


def checkpoint_run_config(checkpoint: str | Path) -> RunConfig:
    """The RunConfig the training loop of a checkpoint (a directory or URI) ran with."""
    saved = read_checkpoint_json(checkpoint, CONFIG_FILE)
    if saved is None:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {checkpoint}: not a checkpoint directory")
    return RunConfig.from_mapping(saved)


def model_differences(saved: dict, other: dict) -> list[str]:
    """The fields in which two model_config.json mappings differ, where both have them: weights of one do not load
    into the other. The context is left out: it changes no weight, and the data loader names the field that sets it."""
    return [key for key in saved.keys() & other.keys() if key != "sequence_len" and saved[key] != other[key]]


def read_training_state(checkpoint: str | Path, field: str, owner: str) -> dict:
    """training_state.json of the checkpoint (a directory or URI) given as owner.field; one line if it has none."""
    state = read_checkpoint_json(checkpoint, TRAINING_STATE_FILE)
    if state is None:
        raise ConfigError(field, f"{checkpoint} is not a checkpoint directory (no {TRAINING_STATE_FILE})", owner)
    return state


def checkpoint_phase(checkpoint_dir: Path) -> str:
    """"base" or "chat", from training_state.json (a checkpoint without one is a base checkpoint)."""
    state_file = Path(checkpoint_dir) / TRAINING_STATE_FILE
    return json.loads(state_file.read_text()).get("phase", "base") if state_file.is_file() else "base"


def _load_local(checkpoint_dir: Path, device: torch.device) -> LoadedModel:
    model_config = GPTConfig.from_dict(json.loads((checkpoint_dir / MODEL_CONFIG_FILE).read_text()))
    # memory-mapped on the CPU: of a file that also holds the optimizers' states (twice the weights), only the
    # weights are read, and only the model's copy of them reaches the device
    weights = read_checkpoint_file(checkpoint_dir / CHECKPOINT_FILE, mmap=True)["model"]
    model = GPT(model_config)
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(model, load_tokenizer(checkpoint_dir / TOKENIZER_DIR), model_config,
                       checkpoint_phase(checkpoint_dir))


def load_model(checkpoint: str | Path, device: torch.device) -> LoadedModel:
    """The model (in eval mode), tokenizer and phase of a checkpoint directory or any fsspec URI (s3://, gs://,
    file://, ...). Of a remote checkpoint only what inference needs is downloaded, to a temp dir that is gone once
    the model is in memory."""
    with tempfile.TemporaryDirectory(prefix="nanochat-checkpoint-") as temp:
        return _load_local(fetch_checkpoint(checkpoint, Path(temp), INFERENCE_FILES), device)
