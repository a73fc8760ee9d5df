"""Download FineWeb-Edu shards (`shard_{index:05d}.parquet` under a data URL) into a local cache, robustly.

- http(s) with requests: redirects followed (the hub redirects resolve/ URLs to its CDN), retries with
  exponential backoff and jitter on connection errors, timeouts, 429 and 5xx (honouring Retry-After), and on
  a body shorter than its Content-Length; an interrupted download resumes with a Range request. A 4xx such
  as 404 fails at once. A gated mirror gets `Authorization: Bearer $HF_TOKEN` (the token is never printed).
- Any other URL goes through fsspec (s3://, gs://, memory://, ...); local paths and file:// are read in place.
- A download streams into `<shard>.part` and is renamed into place only after it verifies (a readable parquet
  footer with a `text` string column): readers never see a partial or corrupt file, and a corrupt file already
  in the cache is downloaded again.
- A shard that still fails after its retries raises ONE ShardDownloadError naming the shard, URL and cause:
  a run never goes on with fewer shards than it asked for.
The cache (NANOCHAT_FLYTE_CACHE, default ~/.cache/nanochat_flyte/shards) assumes one downloader at a time.
"""

import email.utils
import os
import random
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from fsspec.implementations.local import LocalFileSystem

from nanochat_flyte.config import ConfigError

CHUNK_BYTES = 1 << 16  # 64 KiB per read: an interrupted read loses at most this much; syscalls stay few
HTTP_TIMEOUT_S = (10, 60)  # (connect, between bytes): a stalled CDN connection fails and is retried
PROBE_TIMEOUT_S = 10
PROBE_ATTEMPTS = 2


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(data_url: str, index: int) -> str:
    return f"{data_url.rstrip('/')}/{shard_name(index)}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOCHAT_FLYTE_CACHE") or Path.home() / ".cache" / "nanochat_flyte" / "shards")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Retry:
    attempts: int = 6  # 1 try + 5 retries, with up to 1+2+4+8+16 s of backoff: rides out a CDN hiccup
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): the server's Retry-After if it sent one,
        else exponential backoff with jitter, so that parallel downloads do not retry in lockstep."""
        if retry_after is not None:
            return retry_after
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = Retry()


@dataclass
class Download:
    index: int
    url: str
    path: Path  # the verified shard: in the cache, or the source itself for local data
    seconds: float
    bytes: int  # size of the file fetched now: 0 for a cache hit or a local file


class ShardDownloadError(RuntimeError):
    def __init__(self, index: int, url: str, cause: str):
        super().__init__(f"shard {index} could not be downloaded from {url}: {cause}")


class CorruptShard(ValueError):
    """The file is not a FineWeb-Edu shard (unreadable parquet footer or no `text` column)."""


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, short body, ...), with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix (404, 403, a missing file)."""


def verify_shard(path: Path) -> None:
    """Check the parquet footer (cheap: no data pages are read) and the `text` column."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptShard(f"{path.name} is not a readable parquet file: {e}") from e
    if "text" not in schema.names or schema.field("text").type not in (pa.string(), pa.large_string()):
        raise CorruptShard(f"{path.name} has no `text` string column (columns: {schema.names})")


# ----------------------------------------------------------------------------- one file, one attempt

def auth_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def retry_after_seconds(header: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not header:
        return None
    if header.strip().isdigit():
        return float(header)
    when = email.utils.parsedate_to_datetime(header)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def fetch_http(url: str, partial: Path) -> None:
    """Append the rest of `url` to `partial`, resuming with a Range request from the bytes already there."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = auth_headers() | ({"Range": f"bytes={offset}-"} if offset else {})
    with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT_S) as response:
        status = response.status_code
        if status == 416:  # our partial file is not a prefix the server can continue: start over
            partial.unlink()
            raise TransientError(f"HTTP 416: cannot resume at byte {offset}")
        if status == 408 or status == 429 or status >= 500:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise TransientError(f"HTTP {status} {response.reason}", retry_after)
        if status >= 400:
            hint = " (a gated or private mirror needs HF_TOKEN)" if status in (401, 403) else ""
            raise PermanentError(f"HTTP {status} {response.reason}{hint}")
        resumed = status == 206
        if not resumed:
            offset = 0  # the server ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        with open(partial, "ab" if resumed else "wb") as f:
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
    size = partial.stat().st_size
    if length is not None and size < offset + int(length):
        raise TransientError(f"body ended at byte {size} of {offset + int(length)}")


def fetch_fsspec(url: str, partial: Path) -> None:
    """Append the rest of an fsspec URL to `partial`, seeking past the bytes already there."""
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        with fsspec.open(url, "rb") as source, open(partial, "ab") as target:
            source.seek(offset)
            shutil.copyfileobj(source, target, CHUNK_BYTES)
    except FileNotFoundError as e:
        raise PermanentError(f"no such file: {e}") from e


# ----------------------------------------------------------------------------- one shard, with retries

def download_shard(data_url: str, index: int, cache_dir: Path | None = None,
                   retry: Retry = DEFAULT_RETRY) -> Download:
    """Return shard `index` verified on local disk: cached, read in place (local data), or downloaded."""
    url = shard_url(data_url, index)
    start = time.time()
    if not is_http(url):
        fs, local_path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):  # a local path or file://: read in place, no copy
            try:
                verify_shard(Path(local_path))
            except CorruptShard as e:
                raise ShardDownloadError(index, url, str(e)) from e
            return Download(index, url, Path(local_path), time.time() - start, 0)

    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / shard_name(index)
    if cached.exists():
        try:
            verify_shard(cached)
            return Download(index, url, cached, time.time() - start, 0)
        except CorruptShard as e:
            print(f"shard {index}: cached file is corrupt ({e}); downloading it again", flush=True)
            cached.unlink()

    fetch = fetch_http if is_http(url) else fetch_fsspec
    partial = cache_dir / (shard_name(index) + ".part")
    for attempt in range(retry.attempts):
        retry_after = None
        try:
            fetch(url, partial)
            size = partial.stat().st_size
            verify_shard(partial)
            os.replace(partial, cached)  # atomic: the cache holds whole, verified shards only
            return Download(index, url, cached, time.time() - start, size)
        except PermanentError as e:
            raise ShardDownloadError(index, url, str(e)) from e
        except CorruptShard as e:
            partial.unlink()  # resuming would append to bad bytes: start over
            cause = e
        except TransientError as e:
            cause, retry_after = e, e.retry_after
        except (requests.RequestException, OSError) as e:  # connection errors, resets, timeouts
            cause = e
        if attempt + 1 < retry.attempts:
            delay = retry.delay(attempt, retry_after)
            print(f"shard {index}: attempt {attempt + 1}/{retry.attempts} failed ({cause}); "
                  f"retrying in {delay:.1f}s", flush=True)
            time.sleep(delay)
    raise ShardDownloadError(index, url, f"{cause} (gave up after {retry.attempts} attempts)")


def download_shards(data_url: str, indices: list[int], cache_dir: Path | None = None, workers: int = 8,
                    retry: Retry = DEFAULT_RETRY) -> Iterator[Download]:
    """Download `indices` with `workers` threads; yield each shard as it completes, with a progress line.
    The first shard that fails raises its ShardDownloadError (queued downloads are cancelled)."""
    start = time.time()
    transferred = 0
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(download_shard, data_url, index, cache_dir, retry) for index in indices]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                download = future.result()
                transferred += download.bytes
                elapsed = time.time() - start
                eta = elapsed / done * (len(indices) - done)
                print(f"download: {done}/{len(indices)} shards, {transferred / 1e6:.1f} MB in {elapsed:.0f}s, "
                      f"{transferred / 1e6 / max(elapsed, 1e-9):.1f} MB/s, ETA {eta:.0f}s", flush=True)
                yield download
        finally:
            pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- probe

def check_data_url(config) -> None:
    """Fail fast, before any download, when config.data_url cannot serve the validation shard."""
    url = shard_url(config.data_url, config.val_shard)
    for attempt in range(PROBE_ATTEMPTS):
        try:
            if is_http(url):
                response = requests.head(url, headers=auth_headers(), allow_redirects=True, timeout=PROBE_TIMEOUT_S)
                cause = None if response.ok else f"HTTP {response.status_code} {response.reason}"
            else:
                fs, path = fsspec.core.url_to_fs(url)
                cause = None if fs.exists(path) else "no such file"
        except (requests.RequestException, OSError, ImportError, ValueError) as e:  # ImportError: s3fs missing
            cause = str(e)
        if cause is None:
            return
        if attempt + 1 < PROBE_ATTEMPTS:
            time.sleep(1)
    raise ConfigError("data_url", f"{config.data_url!r} is unreachable (probed {url}): {cause}")
