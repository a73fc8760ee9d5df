"""Reads an offline W&B run back, so that tests can check what the Tracker logged without a W&B server.

A .wandb file is a 7-byte header (":W&B", magic, version) followed by a LevelDB-style log: 32 KiB blocks of
records, each with a 7-byte header (CRC-32 of type+payload, payload length, type); a protobuf Record may be
split across blocks as FIRST, MIDDLE..., LAST pieces.
"""

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

WANDB_FILE_HEADER = 7
LOG_BLOCK = 32 * 1024
LOG_RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(wandb_file: Path) -> Iterator["wandb_internal_pb2.Record"]:
    """The protobuf records of a .wandb file, in order, up to the first incomplete one."""
    data = Path(wandb_file).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{wandb_file} is not a W&B transaction log (no ':W&B' header)")
    position, pieces = WANDB_FILE_HEADER, b""
    while position + LOG_RECORD_HEADER <= len(data):
        left_in_block = LOG_BLOCK - position % LOG_BLOCK
        if left_in_block < LOG_RECORD_HEADER:  # block tail too small for a header: zero padding
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + LOG_RECORD_HEADER])
        payload = data[position + LOG_RECORD_HEADER:position + LOG_RECORD_HEADER + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or zlib.crc32(bytes([kind]) + payload) != checksum:
            break  # preallocated zeros or a record torn by a crash: the log ends here
        position += LOG_RECORD_HEADER + length
        pieces = payload if kind in (FULL, FIRST) else pieces + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def _items_to_dict(items) -> dict[str, Any]:
    """History/summary items to a dict; W&B stores a logged object (e.g. a table) as nested keys."""
    values: dict[str, Any] = {}
    for item in items:
        *parents, leaf = item.nested_key or [item.key]
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = json.loads(item.value_json)
    return values


def run_records(run_dir: Path) -> Iterator["wandb_internal_pb2.Record"]:
    """The records of a W&B run directory (offline-run-* or run-*), which holds one run-<id>.wandb file."""
    wandb_files = sorted(Path(run_dir).glob("*.wandb"))
    if len(wandb_files) != 1:
        raise FileNotFoundError(f"expected one .wandb file in {run_dir}, found {len(wandb_files)}")
    return read_wandb_records(wandb_files[0])


def read_offline_history(offline_dir: Path) -> list[dict[str, Any]]:
    """The history rows (what run.log sent, plus W&B's _step etc.) of a W&B run directory."""
    return [_items_to_dict(record.history.item) for record in run_records(offline_dir)
            if record.WhichOneof("record_type") == "history"]


def read_offline_summary(offline_dir: Path) -> dict[str, Any]:
    """The run summary as W&B stored it (later updates win)."""
    summary: dict[str, Any] = {}
    for record in run_records(offline_dir):
        if record.WhichOneof("record_type") == "summary":
            summary.update(_items_to_dict(record.summary.update))
    return summary
