"""Files, written so a reader never sees half of one, and the local paths behind URLs. Every stage writes files
(shards, checkpoints, metrics, manifests, results): they share these. Imports errors only."""

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import fsspec

from nanochat_flyte.errors import UserError


class ErrorsItRaises(logging.Filter):
    """gcsfs logs each request error it then raises, whole traceback included, before the caller's one line about
    it (a data_url probe printed 60 lines of aiohttp for an unreachable host): those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "retry_request"


logging.getLogger("gcsfs").addFilter(ErrorsItRaises())


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for a path or URL. A scheme fsspec does not know (foo://), or whose package is not
    installed (s3fs for s3://), is one line naming the URL."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except (ValueError, ImportError) as error:
        raise UserError(f"{url}: {error}; a path or an fsspec URI (s3://, gs://, ...) with its package installed "
                        "is needed") from None


def local_path(url: str | Path) -> Path | None:
    """The local file or folder a plain path (~ expanded) or a file:// URL names: read in place, never copied into
    a cache. None for any other URL (http, s3://, ...), whose fsspec backend is not even imported here."""
    if fsspec.core.split_protocol(str(url))[0] not in (None, "file", "local"):
        return None
    return Path(fsspec.core.url_to_fs(str(url))[1])


def still_there(paths: Iterable[Path], owner: str) -> bool:
    """Whether every local file or folder a cached output points to is still there. Both Flyte fronts' local caches
    outlive the folders under /tmp their outputs are in (a reboot, a clean-up): where one is gone, says so, for
    `owner` to run again."""
    gone = next((path for path in paths if not path.exists()), None)
    if gone is not None:
        print(f"{owner}: cached output {gone} is gone: running the task again", flush=True)
    return gone is None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp) a temp file beside path, then rename it into place: a process killed mid-write leaves the
    previous file (or none), never half of one that looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    fsync(temp)  # the data on disk before the name points at it: a power loss leaves the old file, not an empty one
    os.replace(temp, path)
    fsync(path.parent)  # and the rename itself


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    def write(temp: Path) -> None:
        with open(temp, "wb") as file:
            file.writelines(chunks)

    write_atomically(path, write)


def write_json(path: Path, values: dict) -> None:
    write_atomically(path, lambda temp: temp.write_text(json.dumps(values, indent=2) + "\n"))
