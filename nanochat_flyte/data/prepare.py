"""The data stage: FineWeb-Edu parquet shards -> uint16 token files + manifest.json (docs/architecture.md).

    data/manifest.json
    data/train/shard_00000.bin ...   raw little-endian uint16 ids; each document is <|endoftext|> + its tokens
    data/val/shard_01822.bin
    data/tokenizer/

Two ways to run it:
- in one process: `prepare_data(config, out_dir)` (tokenizer, parallel downloads overlapped with tokenization,
  merge), also as `nanochat prepare --config PRESET --out-dir DATA [field=value ...]`, the data
  directory that `nanochat train --data-dir DATA` takes;
- on a cluster: `build_tokenizer` once, `prepare_shard` for each `plan_shards` job in its own pod, then
  `merge_prepared` over the per-shard outputs.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tiktoken

from nanochat_flyte.data import MANIFEST_FILE, SOURCE_FIELDS
from nanochat_flyte.data.dataloader import warn_if_repeated
from nanochat_flyte.data.download import Download, download_shard, download_shards
from nanochat_flyte.data.tokenizer import (
    TokenizerError,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_id,
    train_bpe,
)
from nanochat_flyte.errors import ConfigError

STATS_FILE = "stats.json"


@dataclass
class ShardJob:
    index: int
    split: str  # "train" | "val"
    data_url: str
    tokenizer: str

    @property
    def file(self) -> str:
        return f"{self.split}/shard_{self.index:05d}.bin"

    @property
    def name(self) -> str:  # the folder its prepared part is written to
        return f"{self.split}_{self.index:05d}"


def plan_shards(config, tokenizer: str, first_shard_tokens: int | None = None) -> list[ShardJob]:
    """Train shards 0..n-1, then the validation shard, each to be tokenized by `tokenizer` (a tokenizer_id).
    n = config.num_shards, or with only_needed_shards and the token count of train shard 0 (shards are about
    equal in size), just enough shards for num_iterations * total_batch_size tokens."""
    num_train = config.num_shards
    if config.only_needed_shards and first_shard_tokens:
        num_train = min(num_train, math.ceil(config.tokens_needed / first_shard_tokens))
    train = [ShardJob(index, "train", config.data_url, tokenizer) for index in range(num_train)]
    return train + [ShardJob(config.val_shard, "val", config.data_url, tokenizer)]


# ----------------------------------------------------------------------------- tokenizer

def iter_row_groups(parquet_path: Path) -> Iterator[pa.ChunkedArray]:
    """The `text` column one row group (~1024 documents) at a time: memory stays bounded whatever the shard size."""
    shard = pq.ParquetFile(parquet_path)
    for group in range(shard.num_row_groups):
        texts = shard.read_row_group(group, columns=["text"]).column("text")
        if texts.null_count:
            raise ConfigError("data_url", f"{parquet_path.name}: row group {group} has {texts.null_count} documents "
                                          "without text (null): every row of a shard must be a string")
        yield texts


def iter_train_texts(config, cache_dir: Path | None) -> Iterator[str]:
    """Train documents in shard order (a reproducible tokenizer), up to config.bpe_train_chars characters."""
    budget = config.bpe_train_chars
    for index in range(config.num_shards):
        path = download_shard(config.data_url, index, cache_dir).path
        for texts in iter_row_groups(path):
            for text in texts.to_pylist():
                if budget <= 0:
                    return
                yield text[:budget]
                budget -= len(text)


def build_tokenizer(config, out_dir: Path, cache_dir: Path | None = None) -> Path:
    """Write the tokenizer directory: GPT-2's, or a BPE trained on the train shards (downloaded as needed)."""
    if config.tokenizer == "gpt2":
        return save_tokenizer(gpt2_tokenizer(), out_dir)
    start = time.time()
    print(f"bpe: training a {config.bpe_vocab_size}-token tokenizer on up to {config.bpe_train_chars:,} "
          f"characters of train text", flush=True)
    enc = train_bpe(iter_train_texts(config, cache_dir), config.bpe_vocab_size)
    if enc.n_vocab < config.bpe_vocab_size:  # the text ran out of pairs to merge first
        raise ConfigError("bpe_train_chars", f"{config.bpe_train_chars:,} characters of train text taught "
                                             f"{enc.n_vocab:,} of the {config.bpe_vocab_size:,} tokens asked for: give "
                                             "more text, or a smaller bpe_vocab_size")
    print(f"bpe: trained in {time.time() - start:.0f}s", flush=True)
    return save_tokenizer(enc, out_dir)


# ----------------------------------------------------------------------------- tokenization

def encode_row_groups(parquet_path: Path, enc: tiktoken.Encoding,
                      num_threads: int | None = None) -> Iterator[tuple[pa.ChunkedArray, np.ndarray]]:
    """(texts, tokens) for each row group, tokens = <|endoftext|> + the document's tokens for every document,
    as uint16. Documents are encoded on `num_threads` threads (all cores by default), and the next row group is
    queued before this one is handed back, so the threads stay busy while the caller writes."""
    # With no disallowed specials encode_to_numpy gives exactly encode_ordinary's ids (tiktoken documents the
    # equivalence), but it builds no Python list of ints: that conversion holds the GIL and would serialise
    # the threads.
    encode = functools.partial(enc.encode_to_numpy, disallowed_special=())
    eot = np.array([enc.eot_token], dtype=np.uint32)

    def join(texts, token_arrays):
        parts = [part for tokens in token_arrays for part in (eot, tokens)]
        return texts, (np.concatenate(parts) if parts else np.empty(0, np.uint32)).astype("<u2")  # (a 0-row group)

    with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
        queued = deque()
        for texts in iter_row_groups(parquet_path):
            queued.append((texts, pool.map(encode, texts.to_pylist())))
            if len(queued) == 2:
                yield join(*queued.popleft())
        while queued:
            yield join(*queued.popleft())


def tokenize_shard(parquet_path: Path, enc: tiktoken.Encoding, bin_path: Path, num_threads: int | None = None) -> dict:
    """Tokenize one parquet shard into a uint16 .bin file (written whole, then renamed). Returns its stats."""
    if enc.n_vocab > 2**16:
        raise ValueError(f"a {enc.n_vocab}-token vocabulary does not fit the uint16 token files")
    stats = {"tokens": 0, "documents": 0, "characters": 0, "utf8_bytes": 0}
    sha256 = hashlib.sha256()
    partial = bin_path.with_name(bin_path.name + ".tmp")
    with open(partial, "wb") as out:
        for texts, tokens in encode_row_groups(parquet_path, enc, num_threads):
            out.write(tokens)
            sha256.update(tokens)
            stats["tokens"] += len(tokens)
            stats["documents"] += len(texts)
            stats["characters"] += pc.sum(pc.utf8_length(texts), min_count=0).as_py()  # 0 for a 0-row group
            stats["utf8_bytes"] += pc.sum(pc.binary_length(texts), min_count=0).as_py()
    os.replace(partial, bin_path)
    return stats | {"sha256": sha256.hexdigest()}


def count_ordinary_tokens(parquet_path: Path, enc: tiktoken.Encoding) -> int:
    """Tokens of the shard's text alone (no <|endoftext|>): the denominator of bytes per token."""
    return sum(len(tokens) - len(texts) for texts, tokens in encode_row_groups(parquet_path, enc))


def tokenize_download(job: ShardJob, download: Download, enc: tiktoken.Encoding, out_dir: Path) -> dict:
    """Tokenize a downloaded shard into out_dir/{split}/shard_XXXXX.bin and write out_dir/stats.json."""
    if tokenizer_id(enc) != job.tokenizer:
        raise ValueError(f"shard job {job.index} asks for tokenizer {job.tokenizer!r}, the tokenizer directory "
                         f"holds {tokenizer_id(enc)!r}")
    (out_dir / job.split).mkdir(parents=True, exist_ok=True)
    start = time.time()
    stats = tokenize_shard(download.path, enc, out_dir / job.file)
    if job.split == "val" and enc.name != "gpt2":  # our BPE's compression, next to GPT-2's where its ranks can be had
        try:
            stats["gpt2_tokens"] = count_ordinary_tokens(download.path, gpt2_tokenizer())
        except TokenizerError as error:  # a comparison only: an offline BPE run keeps its trained tokenizer
            print(f"note: no GPT-2 compression to compare with: {error}", flush=True)
    seconds = time.time() - start
    stats = {"shard": job.index, "split": job.split, "file": job.file, **stats, "source": download.url,
             "download_seconds": round(download.seconds, 3), "tokenize_seconds": round(seconds, 3)}
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    print(f"tokenized {job.file}: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
          f"{stats['utf8_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s", flush=True)
    return stats


def prepare_shard(job: ShardJob, tokenizer_dir: Path, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """Download (cached) and tokenize ONE shard into out_dir/{split}/shard_XXXXX.bin + out_dir/stats.json.
    Self-contained: on a cluster each call runs in its own pod."""
    download = download_shard(job.data_url, job.index, cache_dir)
    return tokenize_download(job, download, load_tokenizer(tokenizer_dir), Path(out_dir))


# ----------------------------------------------------------------------------- manifest

def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where source and target share a filesystem (instant, no extra disk), else a copy. Made beside
    target, then renamed onto it: a target that exists (an earlier merge's link to another part) is replaced, never
    written through, which would change that part too."""
    temp = target.with_name(f".{target.name}.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        shutil.copyfile(source, temp)
    os.replace(temp, target)


def check_eval_tokens(config, val: dict) -> None:
    """val: the validation shard's stats. Every evaluation reads eval_tokens of it."""
    if val["tokens"] < config.eval_tokens:
        raise ConfigError("eval_tokens", f"{config.eval_tokens:,} is more than the {val['tokens']:,} tokens of "
                                         f"validation shard {val['shard']}")


def merge_prepared(config, parts: list[Path], tokenizer_dir: Path, out_dir: Path) -> dict:
    """Gather the per-shard outputs of prepare_shard into one data directory and write manifest.json.
    Every input is checked before anything is written. The parts are left as they are: in a local Flyte run they
    are cached task outputs that a later run reuses."""
    out_dir = Path(out_dir)
    splits = {"train": [], "val": []}
    sources = {}
    for part in map(Path, parts):
        stats = json.loads((part / STATS_FILE).read_text())
        source = part / stats["file"]
        if source.stat().st_size != 2 * stats["tokens"]:
            raise ValueError(f"{source} holds {source.stat().st_size} bytes, but {part / STATS_FILE} says "
                             f"{stats['tokens']} uint16 tokens")
        if not stats["documents"]:
            raise ConfigError("data_url", f"shard {stats['shard']} ({stats['source']}) has no documents")
        sources[stats["file"]] = source
        splits[stats.pop("split")].append(stats)
    for split, shards in splits.items():
        if not shards:
            raise ValueError(f"no {split} shard among the {len(parts)} prepared parts")
        shards.sort(key=lambda stats: stats["shard"])
    (val,) = splits["val"]
    check_eval_tokens(config, val)

    # A data directory is whole once its manifest is written, last: one being merged again has none meanwhile, so
    # a merge that fails halfway leaves a directory that training refuses, not old shards under a new tokenizer.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for file, source in sources.items():
        (out_dir / file).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(source, out_dir / file)
    for split in splits:  # a shard of the data prepared here before, which this manifest leaves out
        for stale in (out_dir / split).glob("*.bin"):
            if f"{split}/{stale.name}" not in sources:
                stale.unlink()
    if Path(tokenizer_dir).resolve() != (out_dir / "tokenizer").resolve():
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)  # no file of another tokenizer stays beside it
        shutil.copytree(tokenizer_dir, out_dir / "tokenizer")
    info = json.loads((out_dir / "tokenizer" / "tokenizer.json").read_text())
    # Compression: text bytes per token, not counting the one <|endoftext|> per document.
    tokenizer = {"name": info["name"], "vocab_size": info["vocab_size"], "eot_id": info["eot_id"],
                 "val_bytes_per_token": round(val["utf8_bytes"] / (val["tokens"] - val["documents"]), 3)}
    if "gpt2_tokens" in val:
        tokenizer["gpt2_val_bytes_per_token"] = round(val["utf8_bytes"] / val["gpt2_tokens"], 3)

    train_tokens = sum(shard["tokens"] for shard in splits["train"])
    val_tokens = val["tokens"]
    # No run length here: one data directory serves runs of any num_iterations (epochs() tells each its share)
    manifest = {"source": {field: getattr(config, field) for field in SOURCE_FIELDS},
                "tokenizer": tokenizer, "train": splits["train"], "val": splits["val"],
                "train_tokens": train_tokens, "val_tokens": val_tokens}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    compared = f" (GPT-2: {tokenizer['gpt2_val_bytes_per_token']})" if "gpt2_tokens" in val else ""
    print(f"data: {len(splits['train'])} train shards, {train_tokens:,} train tokens, {val_tokens:,} val tokens; "
          f"tokenizer {info['name']}: {tokenizer['val_bytes_per_token']} bytes/token on val{compared}", flush=True)
    return manifest


# ----------------------------------------------------------------------------- the whole stage

def prepare_jobs(config, jobs: list[ShardJob], enc: tiktoken.Encoding, parts_dir: Path,
                 cache_dir: Path | None) -> list[Path]:
    """Download `jobs` in parallel and tokenize each shard as soon as it arrives (downloads go on meanwhile)."""
    jobs_by_index = {job.index: job for job in jobs}
    parts = []
    for index, download in download_shards(config.data_url, list(jobs_by_index), cache_dir, config.download_workers):
        job = jobs_by_index[index]
        part = parts_dir / job.name
        tokenize_download(job, download, enc, part)
        parts.append(part)
    return parts


def plan_jobs(config, tokenizer_dir: Path, cache_dir: Path | None = None) -> list[ShardJob]:
    """plan_shards for a cluster, where each shard is prepared in its own pod: with only_needed_shards, train
    shard 0 is downloaded and counted here to size the plan."""
    enc = load_tokenizer(tokenizer_dir)
    first_shard_tokens = None
    if config.only_needed_shards:
        shard_0 = download_shard(config.data_url, 0, cache_dir).path
        first_shard_tokens = sum(len(tokens) for _, tokens in encode_row_groups(shard_0, enc))
    return plan_shards(config, tokenizer_id(enc), first_shard_tokens)


def prepare_data(config, out_dir: Path, cache_dir: Path | None = None) -> dict:
    """The whole data stage in this process: tokenizer, the validation shard (checked against eval_tokens before any
    train shard), the train shards' parallel downloads and tokenization, merge -> manifest. Until the merge all of
    it goes under out_dir/parts: a prepare that fails leaves the data directory that was there whole."""
    out_dir = Path(out_dir)
    parts_dir = out_dir / "parts"
    try:
        parts_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("out_dir", f"cannot create {str(out_dir)!r}: {error.strerror}", "prepare") from None
    with sole_writer(parts_dir, out_dir):
        return prepare_parts(config, parts_dir, out_dir, cache_dir)


@contextlib.contextmanager
def sole_writer(parts_dir: Path, out_dir: Path) -> Iterator[None]:
    """Hold parts_dir for this prepare alone: a second prepare into the same out_dir (the same command in another
    terminal) fails in one line, where it would write the same part files, and delete them under the first."""
    with open(parts_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, or the process ends
        except BlockingIOError:
            raise ConfigError("out_dir", f"another prepare is writing into {str(out_dir)!r} now: wait for it to end, "
                                         "or choose another out_dir", "prepare") from None
        yield


def prepare_parts(config, parts_dir: Path, out_dir: Path, cache_dir: Path | None) -> dict:
    tokenizer_dir = build_tokenizer(config, parts_dir / "tokenizer", cache_dir)
    enc = load_tokenizer(tokenizer_dir)
    *train_jobs, val_job = plan_shards(config, tokenizer_id(enc))
    parts = prepare_jobs(config, [val_job], enc, parts_dir, cache_dir)
    check_eval_tokens(config, json.loads((parts[0] / STATS_FILE).read_text()))
    if config.only_needed_shards:  # shard 0's size tells how many shards the run needs
        parts += prepare_jobs(config, train_jobs[:1], enc, parts_dir, cache_dir)
        first_shard_tokens = json.loads((parts[-1] / STATS_FILE).read_text())["tokens"]
        train_jobs = plan_shards(config, tokenizer_id(enc), first_shard_tokens)[1:-1]
    parts += prepare_jobs(config, train_jobs, enc, parts_dir, cache_dir)
    manifest = merge_prepared(config, parts, tokenizer_dir, out_dir)
    shutil.rmtree(parts_dir)
    warn_if_repeated(config, manifest["train_tokens"])
    return manifest
