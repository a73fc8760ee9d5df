"""Memory-mapped training batches: deterministic, resumable, DDP-sharded, prefetched on CUDA.

The train shards are raw uint16 token files (see docs/architecture.md). We cut every shard into windows of
max_seq_len + 1 tokens that start every max_seq_len tokens (each window's last target is the next window's
first input), and visit all windows in a random order drawn from the seed, a fresh order each epoch.

The whole run is one stream of windows, so the loader's position is a single number: how many windows were
consumed. A micro-batch is the next world_size * batch_size windows of the stream and rank r takes the r-th
slice of it, so N ranks see exactly the tokens one process sees with N times the gradient accumulation.
"""

import json
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from nanochat_flyte.data import MANIFEST_FILE
from nanochat_flyte.errors import ConfigError

PREFETCH_BATCHES = 2  # enough to hide one host->device copy behind a step; more only holds pinned memory


def epochs(config, train_tokens: int) -> float:
    """How many times a run of config's length reads the prepared train tokens."""
    return round(config.tokens_needed / train_tokens, 4)


def warn_if_repeated(config, train_tokens: int) -> None:
    if (times := epochs(config, train_tokens)) > 1:
        print(f"WARNING: training needs {config.tokens_needed:,} tokens but only {train_tokens:,} train tokens are "
              f"prepared: the data will repeat ({times:.2f} epochs). Raise num_shards to avoid it.", flush=True)


class Order:
    """A stream's item at any position: epoch e visits all n items in a permutation drawn from (seed, e). The
    pretraining windows' order here, SFT's conversations' in packing."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self._permutation = -1, None  # the epoch whose permutation is held

    def __getitem__(self, position: int) -> int:
        epoch, index = divmod(position, self.n)
        if not self.shuffle:
            return index
        if epoch != self.epoch:
            self.epoch, self._permutation = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._permutation[index])


class TokenLoader:
    """Yields (inputs, targets) int64 tensors of shape (batch_size, seq_len) on `device`."""

    def __init__(self, train_files: list[Path], batch_size: int, seq_len: int, *, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, prefetch: bool | None = None):
        self.shards = [np.memmap(path, dtype=np.uint16, mode="r") for path in train_files]
        windows_per_shard = [(len(tokens) - 1) // seq_len for tokens in self.shards]
        if sum(windows_per_shard) < batch_size * world_size:
            raise ConfigError("max_seq_len", f"the train data holds {sum(windows_per_shard)} windows of "
                                             f"{seq_len + 1} tokens, fewer than one micro-batch of {batch_size} x "
                                             f"{world_size} ranks: a shorter context, a smaller device_batch_size or "
                                             "more data")
        # window w of the run-wide numbering lives in shard shard_of[w], starting at token start_of[w]
        self.shard_of = np.repeat(np.arange(len(self.shards)), windows_per_shard)
        self.start_of = np.concatenate([np.arange(n) * seq_len for n in windows_per_shard])
        self.num_windows = len(self.shard_of)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.device, self.rank, self.world_size = device, rank, world_size
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.verbose = rank == 0  # one rank announces a new epoch
        self.windows_consumed = 0
        self.announced_epoch = 0  # the epoch whose start was said (a resumed run's is said by the run it resumes)
        self.order = Order(self.num_windows, seed)
        self._thread = None

    # ------------------------------------------------------------------ position

    @property
    def epoch(self) -> float:
        return self.windows_consumed / self.num_windows

    def state_dict(self) -> dict:
        return {"windows_consumed": self.windows_consumed, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        # each saved fact, and where the user sets it
        for key, (field, owner) in (("seed", ("seed", "RunConfig")), ("seq_len", ("max_seq_len", "RunConfig")),
                                    ("num_windows", ("data_dir", "train"))):
            if state[key] != getattr(self, key):
                raise ConfigError(field, f"the checkpoint being resumed was trained with {key} {state[key]}, this run "
                                         f"has {getattr(self, key)}: the data would not continue where it stopped",
                                  owner)
        self._stop_prefetch()
        self.windows_consumed = state["windows_consumed"]
        self.announced_epoch = self.windows_consumed // self.num_windows

    # ------------------------------------------------------------------ batches

    def _read_batch(self, first_window: int) -> torch.Tensor:
        """This rank's slice of the micro-batch that starts at stream position first_window, on the host: its
        windows of seq_len + 1 tokens (pinned where the device is a GPU)."""
        first = first_window + self.rank * self.batch_size
        rows = []
        for position in range(first, first + self.batch_size):
            epoch = position // self.num_windows
            if self.verbose and epoch > self.announced_epoch:
                print(f"data: train tokens exhausted, starting epoch {epoch + 1}", flush=True)
                self.announced_epoch = epoch
            window = self.order[position]
            start = self.start_of[window]
            rows.append(self.shards[self.shard_of[window]][start:start + self.seq_len + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        # pinned whole: a pinned [:, :-1] view would keep its strides, and the copy of a non-contiguous pinned
        # tensor goes through a pageable temporary, which is no faster than not pinning
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def _to_device(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) on the device, each contiguous: one copy of the windows (overlapping the running step,
        from pinned memory), sliced there."""
        batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        stride = self.batch_size * self.world_size
        if not self.prefetch:
            batch = self._read_batch(self.windows_consumed)
        else:
            if self._thread is None:
                self._start_prefetch(self.windows_consumed)
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                raise batch
        self.windows_consumed += stride
        return self._to_device(batch)

    # ------------------------------------------------------------------ background prefetch

    def _start_prefetch(self, first_window: int) -> None:
        self._queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(first_window, self._queue, self._stop),
                                        daemon=True, name="token-prefetch")
        self._thread.start()

    def _produce(self, position: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:  # wait for room, but give up as soon as the loader is stopped
            while not stop.is_set():
                try:
                    return out.put(item, timeout=0.1)
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                put(self._read_batch(position))
                position += self.batch_size * self.world_size
        except BaseException as error:  # hand the error to the consumer instead of dying silently
            put(error)

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._stop_prefetch()


# What every pretraining data directory's manifest has (data/prepare.py's merge_prepared); a chat stage's has others
MANIFEST_KEYS = ("tokenizer", "train", "val", "train_tokens", "val_tokens")


def data_manifest(data_dir: Path) -> dict:
    """data_dir/manifest.json: what a prepared data directory holds (data/prepare.py writes it). One line (on
    data_dir) for a manifest that is not JSON, or not pretraining's (a chat stage's data directory)."""
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared data directory: it has no manifest.json, which "
                                "`nanochat prepare` writes when it is done")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ConfigError("data_dir", f"{path} is not a JSON document ({error}): prepare the data directory again "
                                      "(nanochat prepare)", "train") from None
    missing = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else MANIFEST_KEYS
    if missing:
        raise ConfigError("data_dir", f"{data_dir} holds no pretraining data: its manifest.json has no "
                                      f"{', '.join(missing)} (a chat stage's data? `nanochat prepare` writes "
                                      "pretraining's)", "train")
    return manifest


def shard_files(data_dir: Path, split: str) -> list[Path]:
    """The shards of one split ("train" or "val") listed in data_dir/manifest.json, in manifest order."""
    files = [data_dir / entry["file"] for entry in data_manifest(data_dir)[split]]
    if not files:
        raise ValueError(f"{data_dir / MANIFEST_FILE} lists no {split} shards")
    return files


def validation_tokens(data_dir: Path, num_tokens: int) -> np.ndarray:
    """The first num_tokens validation tokens (all of them if the split is shorter; training refuses that before
    it starts): the fixed slice bpb is measured on."""
    pieces, remaining = [], num_tokens
    for path in shard_files(data_dir, "val"):
        piece = np.memmap(path, dtype=np.uint16, mode="r")[:remaining]
        pieces.append(piece)
        remaining -= len(piece)
        if remaining == 0:
            break
    return np.concatenate(pieces)
