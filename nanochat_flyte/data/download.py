"""Download files robustly into a local cache: FineWeb-Edu shards, the CORE eval bundle, hub datasets.

- http(s) with requests: redirects followed (the hub redirects resolve/ URLs to its CDN), retries with
  exponential backoff and jitter on connection errors, timeouts, 429 and 5xx (honouring Retry-After), and on
  a body shorter than its Content-Length; an interrupted download resumes with a Range request, and If-Range
  with the file's ETag (or Last-Modified) where the server gave one: a file changed since is sent whole, never
  spliced onto the old one's first bytes. A 4xx such as 404 fails at once. The hub's own host (a gated mirror's)
  gets `Authorization: Bearer $HF_TOKEN`, and no other host does (the token is never printed).
- Any other URL goes through fsspec (s3://, gs://, memory://, ...); local paths and file:// are read in place.
- A download streams into `<file>.part` and is renamed into place only after it verifies (for a shard: a
  parquet file with a `text` string column whose every page decodes): readers never see a partial or corrupt
  file, and a corrupt file already in the cache is downloaded again.
- A file that still fails after its retries raises ONE DownloadError naming what it is, the URL and the cause:
  a run never goes on with fewer files than it asked for. A file the source does not have is "not found".
The cache (NANOCHAT_FLYTE_CACHE, default ~/.cache/nanochat_flyte; one folder per kind of file, and in it one
per source: source_key) assumes one downloader at a time.
"""

import email.utils
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from nanochat_flyte.config import http_url_problem
from nanochat_flyte.errors import ConfigError, UserError, is_credentials_error, is_object_store_error, user_message
from nanochat_flyte.files import local_path, write_bytes_atomically

CHUNK_BYTES = 1 << 16  # 64 KiB per read: an interrupted read loses at most this much; syscalls stay few
HTTP_TIMEOUT_S = (10, 60)  # (connect, between bytes): a stalled CDN connection fails and is retried
PROBE_TIMEOUT_S = 10  # a HEAD request that checks a URL before any download: a live server answers in far less
PROBE_ATTEMPTS = 2  # one retry, so a dropped connection is not taken for a missing shard
PROBE_WORKERS = 16  # HEAD requests at once when checking that every shard exists
PROBE_BATCH = 1024  # train shards probed at a time; the probing ends with the first batch that misses one
DEFAULT_ENDPOINT = "https://huggingface.co"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_url(data_url: str, index: int) -> str:
    return f"{data_url.rstrip('/')}/{shard_name(index)}"


def default_cache_dir(kind: str = "shards") -> Path:
    """Where downloads of one kind ("shards", "eval_bundle", "hub", ...) are cached."""
    root = os.environ.get("NANOCHAT_FLYTE_CACHE") or Path.home() / ".cache" / "nanochat_flyte"
    return Path(root) / kind


def source_key(url: str) -> str:
    """A short name for a source (a data_url, a hub endpoint, a bundle's URL): each gets a cache folder of its own,
    so that the same file name from two sources (a test server's shard 0 and the hub's) never shares a cached file."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Retry:
    attempts: int = 6  # 1 try + 5 retries, with up to 1+2+4+8+16 s of backoff: rides out a CDN hiccup
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0  # a rate limit's window; a server asking for a day would stall the run a day

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): the server's Retry-After if it sent one (up to
        retry_after_max_s), else exponential backoff with jitter, so that parallel downloads do not retry in
        lockstep."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_s)
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = Retry()


@dataclass
class Download:
    url: str
    path: Path  # the verified file: in the cache, or the source itself for local data
    seconds: float
    bytes: int  # size of the file fetched now: 0 for a cache hit or a local file


class DownloadError(UserError, RuntimeError):
    """One file could not be had: `what` names it for people ("shard 3", "the CORE eval bundle")."""

    def __init__(self, what: str, url: str, cause: str):
        self.what, self.url, self.cause = what, url, cause
        super().__init__(f"{what} could not be downloaded from {url}: {cause}")


class CorruptFile(ValueError):
    """The bytes are not the file they should be (for a shard: no readable parquet footer or no `text` column)."""


class WrongColumns(CorruptFile):
    """A whole, readable parquet file without the columns asked for: a download again brings the same file."""


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, short body, ...), with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix (404, 403, a missing file)."""


class Cancelled(Exception):
    """The download was told to stop (another file of its batch failed); its partial file is kept to resume."""


def raise_if_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled()


def readable_parquet_schema(path: Path) -> pa.Schema:
    """The parquet footer's schema (cheap: no data pages are read), or CorruptFile."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptFile(f"{path.name} is not a readable parquet file: {e}") from e


def check_pages(path: Path, columns: list[str] | None = None) -> None:
    """Decode every data page of `columns` (None: all), a row group at a time, or CorruptFile. A whole footer can
    sit on damaged pages (a bad disk, a resumed download spliced wrongly): kept in the cache, such a file would
    fail every run later, while tokenizing, without naming itself."""
    try:
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            file.read_row_group(group, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise CorruptFile(f"{path.name} has a damaged data page: {e}") from e


def verify_shard(path: Path) -> None:
    """A FineWeb-Edu shard's check: a parquet file with a `text` string column, whose pages all decode."""
    schema = readable_parquet_schema(path)
    if "text" not in schema.names or schema.field("text").type not in (pa.string(), pa.large_string()):
        raise WrongColumns(f"{path.name} has no `text` string column (columns: {schema.names})")
    check_pages(path, ["text"])


# ----------------------------------------------------------------------------- one file, one attempt

def hub_endpoint(explicit: str = "") -> str:
    """The hub to ask: `explicit`, else $HF_ENDPOINT, else https://huggingface.co; without a trailing slash."""
    endpoint = explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if problem := http_url_problem(endpoint):  # (a config's hf_endpoint is checked with the config)
        field, owner = ("hf_endpoint", "config") if explicit else ("HF_ENDPOINT", "environment")
        raise ConfigError(field, f"must be an http(s) URL, got {endpoint!r} ({problem})", owner)
    return endpoint.rstrip("/")


def auth_headers(url: str, hub: str = "") -> dict[str, str]:
    """$HF_TOKEN for a URL on the host of the hub (`hub`, else hub_endpoint()'s), and for no other: a data_url
    on another server, the CORE bundle's host or a file that a listing names elsewhere never sees the token."""
    token = os.environ.get("HF_TOKEN")
    if not token or urlsplit(url).netloc != urlsplit(hub_endpoint(hub)).netloc:
        return {}
    return {"Authorization": f"Bearer {token}"}


def retry_after_seconds(header: str | None) -> float | None:
    """Retry-After is delta-seconds (a fraction is taken too) or an HTTP date (read as UTC when it has no zone).
    Anything else ("soon") is None: the usual backoff, never a failed download."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def raise_for_status(response: requests.Response) -> None:
    """Sort an HTTP error into transient (retry) or permanent (fail now)."""
    status = response.status_code
    if status == 408 or status == 429 or status >= 500:
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        raise TransientError(f"HTTP {status} {response.reason}", retry_after)
    if status == 404:
        raise PermanentError("not found (HTTP 404)")
    if status >= 400:
        hint = " (a gated or private mirror needs HF_TOKEN)" if status in (401, 403) else ""
        raise PermanentError(f"HTTP {status} {response.reason}{hint}")


def validator_path(partial: Path) -> Path:
    """Beside a partial download: the version of the file its bytes came from (HTTP's ETag or Last-Modified, an
    fsspec store's ukey)."""
    return partial.with_name(partial.name + ".validator")


def discard_partial(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    validator_path(partial).unlink(missing_ok=True)


def fetch_http(url: str, partial: Path, hub: str = "", stop: threading.Event | None = None) -> None:
    """Append the rest of `url` to `partial`, resuming with a Range request from the bytes already there. The
    Range carries If-Range with the validator the first response gave (a strong ETag, else Last-Modified): a
    server whose file has changed since answers with the whole new file, which replaces the partial one. `stop`,
    once set, ends the transfer at the next chunk."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = auth_headers(url, hub)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator_path(partial).exists():
            headers["If-Range"] = validator_path(partial).read_text()
    with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT_S) as response:
        if response.status_code == 416:
            if response.headers.get("Content-Range") == f"bytes */{offset}":  # the partial file is whole already
                return  # (stopped between its last byte and the rename): it is verified as any download
            discard_partial(partial)  # not a prefix the server can continue: start over
            raise TransientError(f"HTTP 416: cannot resume at byte {offset}")
        raise_for_status(response)
        resumed = response.status_code == 206
        if not resumed:  # the whole file: Range ignored, or If-Range found the file changed
            offset = 0
            etag = response.headers.get("ETag", "")
            validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
            validator_path(partial).unlink(missing_ok=True)
            if validator:  # a weak ETag cannot resume a byte range
                write_bytes_atomically(validator_path(partial), [validator.encode()])
        length = response.headers.get("Content-Length")
        with open(partial, "ab" if resumed else "wb") as f:
            for chunk in response.iter_content(CHUNK_BYTES):
                raise_if_stopped(stop)
                f.write(chunk)
    size = partial.stat().st_size
    if length is not None and size < offset + int(length):
        raise TransientError(f"body ended at byte {size} of {offset + int(length)}")


def fetch_fsspec(url: str, partial: Path, stop: threading.Event | None = None) -> None:
    """Append the rest of an fsspec URL to `partial`, seeking past the bytes already there, when the object is the
    one those bytes came from: its store's key for this version (fsspec's ukey: an ETag, a generation, size and
    time) is kept beside the partial file. A changed object is fetched whole again. `stop`: as for fetch_http."""
    filesystem, path = fsspec.core.url_to_fs(url)
    try:
        version = filesystem.ukey(path)
        if not (partial.exists() and validator_path(partial).exists()
                and validator_path(partial).read_text() == version):
            discard_partial(partial)
            write_bytes_atomically(validator_path(partial), [version.encode()])
        offset = partial.stat().st_size if partial.exists() else 0
        with filesystem.open(path, "rb") as source, open(partial, "ab") as target:
            source.seek(offset)
            while chunk := source.read(CHUNK_BYTES):
                raise_if_stopped(stop)
                target.write(chunk)
    except FileNotFoundError as e:
        raise PermanentError(f"not found: {e}") from e


# ----------------------------------------------------------------------------- one file, with retries

def with_retries(action: Callable[[], object], what: str, url: str, retry: Retry = DEFAULT_RETRY,
                 on_corrupt: Callable[[], None] | None = None, stop: threading.Event | None = None):
    """Run `action` until it succeeds: transient failures are retried with backoff, permanent ones raise at
    once, and the last failure raises one DownloadError naming `what`. `stop`, once set, ends the waiting and
    the retrying with Cancelled."""
    for attempt in range(retry.attempts):
        retry_after = None
        raise_if_stopped(stop)
        try:
            return action()
        except PermanentError as e:
            raise DownloadError(what, url, str(e)) from e
        except CorruptFile as e:
            if on_corrupt:
                on_corrupt()
            if isinstance(e, WrongColumns):
                raise DownloadError(what, url, str(e)) from e
            cause = e
        except TransientError as e:
            cause, retry_after = e, e.retry_after
        except (requests.RequestException, OSError) as e:  # connection errors, resets, timeouts
            cause = e
        if attempt + 1 < retry.attempts:
            delay = retry.delay(attempt, retry_after)
            print(f"{what}: attempt {attempt + 1}/{retry.attempts} failed ({cause}); retrying in {delay:.1f}s",
                  flush=True)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
    raise DownloadError(what, url, f"{cause} (gave up after {retry.attempts} attempts)")


def download_file(url: str, cached: Path, verify: Callable[[Path], None], what: str,
                  retry: Retry = DEFAULT_RETRY, hub: str = "", stop: threading.Event | None = None) -> Download:
    """The file at `url`, verified, on local disk: read in place (local data), from the cache at `cached`, or
    downloaded there. `verify(path)` raises CorruptFile for bytes that are not the expected file. hub: the
    endpoint whose host may see $HF_TOKEN (auth_headers). stop: once set, the download raises Cancelled."""
    start = time.time()
    if (path := local_path(url)) is not None:
        if not path.exists():
            raise DownloadError(what, url, "not found")
        try:
            verify(path)
        except CorruptFile as e:
            raise DownloadError(what, url, str(e)) from e
        return Download(url, path, time.time() - start, 0)

    cached.parent.mkdir(parents=True, exist_ok=True)
    if cached.exists():
        try:
            verify(cached)
            return Download(url, cached, time.time() - start, 0)
        except CorruptFile as e:
            print(f"{what}: cached file is corrupt ({e}); downloading it again", flush=True)
            cached.unlink()

    partial = cached.with_name(cached.name + ".part")

    def attempt() -> Download:
        fetch_http(url, partial, hub, stop) if is_http(url) else fetch_fsspec(url, partial, stop)
        size = partial.stat().st_size
        verify(partial)
        os.replace(partial, cached)  # atomic: the cache holds whole, verified files only
        validator_path(partial).unlink(missing_ok=True)
        return Download(url, cached, time.time() - start, size)

    return with_retries(attempt, what, url, retry, on_corrupt=lambda: discard_partial(partial), stop=stop)


def get_json(url: str, what: str, retry: Retry = DEFAULT_RETRY, hub: str = ""):
    """A small JSON document over http(s) (an API listing), with the same retries as a download."""

    def attempt():
        response = requests.get(url, headers=auth_headers(url, hub), timeout=HTTP_TIMEOUT_S)
        raise_for_status(response)
        try:
            return response.json()
        except ValueError as e:
            raise CorruptFile(f"the answer is not JSON: {response.text[:100]!r}") from e

    return with_retries(attempt, what, url, retry)


# ----------------------------------------------------------------------------- shards

def download_shard(data_url: str, index: int, cache_dir: Path | None = None,
                   retry: Retry = DEFAULT_RETRY, stop: threading.Event | None = None) -> Download:
    """Return shard `index` verified on local disk: cached (in cache_dir's folder for data_url), read in place
    (local data), or downloaded."""
    cached = Path(cache_dir or default_cache_dir("shards")) / source_key(data_url) / shard_name(index)
    return download_file(shard_url(data_url, index), cached, verify_shard, f"shard {index}", retry, stop=stop)


def download_shards(data_url: str, indices: list[int], cache_dir: Path | None = None, workers: int = 8,
                    retry: Retry = DEFAULT_RETRY) -> Iterator[tuple[int, Download]]:
    """Download `indices` with `workers` threads; yield (index, download) as each completes, with a progress
    line. The first shard that fails raises its DownloadError at once: queued downloads are cancelled, and the
    running ones stop at their next chunk or retry (their partial files stay, to resume)."""
    start = time.time()
    transferred = 0
    stop = threading.Event()
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(download_shard, data_url, index, cache_dir, retry, stop): index for index in indices}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                download = future.result()
                transferred += download.bytes
                elapsed = time.time() - start
                eta = elapsed / done * (len(indices) - done)
                print(f"download: {done}/{len(indices)} shards, {transferred / 1e6:.1f} MB in {elapsed:.0f}s, "
                      f"{transferred / 1e6 / max(elapsed, 1e-9):.1f} MB/s, ETA {eta:.0f}s", flush=True)
                yield futures[future], download
        finally:
            stop.set()
            pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- probe

def short_reason(error: Exception) -> str:
    """The reason inside an error: requests nests it deep ("HTTPConnectionPool(...): Max retries exceeded ...
    [Errno 111] Connection refused"))"), which is all a user needs to read."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return match.group(1) if match else (str(error).splitlines() or [type(error).__name__])[0][:300]


def probe(url: str) -> str | None:
    """None when the file at url exists; "not found" when the source answers that it has no such file; any
    other text says why the source could not be asked (connection refused, HTTP 503, ...)."""
    cause = "not probed"
    for attempt in range(PROBE_ATTEMPTS):
        try:
            if is_http(url):
                response = requests.head(url, headers=auth_headers(url), allow_redirects=True,
                                         timeout=PROBE_TIMEOUT_S)
                if response.status_code == 404:
                    return "not found"
                cause = None if response.ok else f"HTTP {response.status_code} {response.reason}"
            else:
                fs, path = fsspec.core.url_to_fs(url)
                return None if fs.exists(path) else "not found"
        except (requests.RequestException, OSError, ImportError, ValueError) as e:  # ImportError: s3fs missing
            cause = short_reason(e)
        except Exception as e:  # an object store without credentials: no other attempt finds them
            if is_credentials_error(e):
                return user_message(e)
            if not is_object_store_error(e):  # (obstore's errors: Flyte 2's s3:// and gs://)
                raise
            cause = user_message(e)
        if cause is None:
            return None
        if attempt + 1 < PROBE_ATTEMPTS:
            time.sleep(1)
    return cause


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> "0..3, 7, 9..10"."""
    ranges: list[list[int]] = []
    for index in sorted(indices):
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges)


def check_data_url(config) -> None:
    """Fail fast, before any download, unless config.data_url serves every shard the run asks for: train shards
    0..num_shards-1 and the validation shard, probed in parallel. The train shards go PROBE_BATCH at a time, in order,
    and the probing stops after the first batch with a missing shard: a num_shards far beyond what the source has
    costs one batch, not a probe of every shard named. Raises one ConfigError naming the field."""
    def answer(index: int) -> str | None:
        return probe(shard_url(config.data_url, index))

    def raise_if_unreachable(index: int, result: str | None) -> None:
        if result not in (None, "not found"):
            raise ConfigError("data_url", f"{config.data_url!r} is unreachable (probed "
                                          f"{shard_url(config.data_url, index)}): {result}")

    present, missing, probed = [], [], 0
    with ThreadPoolExecutor(PROBE_WORKERS) as pool:
        try:
            val_probe = pool.submit(answer, config.val_shard)
            while probed < config.num_shards and not missing:
                batch = range(probed, min(probed + PROBE_BATCH, config.num_shards))
                for index, result in zip(batch, pool.map(answer, batch)):
                    raise_if_unreachable(index, result)
                    (present if result is None else missing).append(index)
                probed = batch.stop
            val_answer = val_probe.result()
        finally:  # an unreachable source: the probes still queued would each wait out their timeouts
            pool.shutdown(cancel_futures=True)
    raise_if_unreachable(config.val_shard, val_answer)
    if not present and val_answer == "not found":
        raise ConfigError("data_url", f"{config.data_url!r} is unreachable or empty: it serves none of the "
                                      f"requested shards ({shard_url(config.data_url, config.val_shard)}: not found)")
    if missing:
        has = f"has shards {index_ranges(present)}" if present else "has none of them"
        unprobed = f"; {probed}..{config.num_shards - 1} not probed" if probed < config.num_shards else ""
        raise ConfigError("num_shards", f"data_url {has}; num_shards="
                                        f"{config.num_shards} needs 0..{config.num_shards - 1} (not found: "
                                        f"{index_ranges(missing)}{unprobed})")
    if val_answer == "not found":
        raise ConfigError("val_shard", f"data_url has no shard {config.val_shard} (not found: "
                                       f"{shard_url(config.data_url, config.val_shard)})")
