"""Datasets from the Hugging Face hub (or a mirror) without the `datasets` package: the parquet listing API.

Every dataset on the hub has an automatic parquet export. `GET {endpoint}/api/datasets/{repo}/parquet/{subset}/{split}`
answers a JSON list of its parquet files' URLs (on the hub: `.../parquet/{subset}/{split}/0.parquet`, which
redirect to a CDN). We download each with `download.download_file` (retries, resume, a parquet check,
the cache) into

    default_cache_dir("hub") / <source_key(endpoint)> / <repo with / -> --> / <subset> / <split> / 00000.parquet, ...

and keep the listing beside them (`listing.json`), so that a second call, or a relaunch on the same disk, asks
the network nothing (split_rows counts a split's rows from the files' footers, their last bytes, without downloading
them). Each endpoint has a folder of its own: a mirror's files never stand in for the hub's. The
endpoint is the one every hub client honours: an explicit value, else $HF_ENDPOINT, else https://huggingface.co. A
gated mirror gets $HF_TOKEN (download.auth_headers), on its own host only: a file that a listing names on another
host is fetched without it, and requests drops the header when a redirect leaves the host, so the CDN never sees
it.
"""

import hashlib
import json
import re
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from nanochat_flyte.data.download import (
    DEFAULT_RETRY,
    HTTP_TIMEOUT_S,
    CorruptFile,
    DownloadError,
    Retry,
    WrongColumns,
    auth_headers,
    check_pages,
    default_cache_dir,
    download_file,
    get_json,
    hub_endpoint,
    raise_for_status,
    readable_parquet_schema,
    source_key,
    with_retries,
)
from nanochat_flyte.files import write_bytes_atomically

DOWNLOAD_WORKERS = 4  # parquet files of one split fetched at once (SmolTalk's train split has a few)
LISTING_FILE = "listing.json"
ROWS_PER_BATCH = 1024  # rows turned into Python objects at once: a few MB, where a whole file would be GBs
# A parquet file ends with its metadata (the footer: row groups, row counts), then the footer's length and "PAR1". The
# tail asked for first holds a whole footer of these datasets' files (a few KB each); a longer one is asked for again,
# up to a length no footer of theirs comes near (a larger one is a file that its download will check).
FOOTER_PROBE_BYTES = 64 * 1024
MAX_FOOTER_BYTES = 16 * 2**20
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)", re.ASCII)


def listing_url(repo: str, subset: str, split: str, endpoint: str = "") -> str:
    return f"{hub_endpoint(endpoint)}/api/datasets/{repo}/parquet/{subset}/{split}"


def split_name(repo: str, subset: str, split: str) -> str:
    """How errors name a split: "cais/mmlu all/test"."""
    return f"{repo} {subset}/{split}"


def parquet_urls(repo: str, subset: str, split: str, endpoint: str = "", retry: Retry = DEFAULT_RETRY) -> list[str]:
    """The URLs of the split's parquet files, from the listing API. A split the hub does not have (404), or an
    answer that is not a non-empty list of URLs, raises one DownloadError naming the split and the URL."""
    url = listing_url(repo, subset, split, endpoint)
    what = f"the parquet listing of {split_name(repo, subset, split)}"
    urls = get_json(url, what, retry, endpoint)
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                         for u in urls):
        raise DownloadError(what, url, f"expected a non-empty JSON list of parquet URLs, got {str(urls)[:200]!r}")
    return urls


def split_cache_dir(repo: str, subset: str, split: str, cache_dir: Path | None = None, endpoint: str = "") -> Path:
    root = Path(cache_dir or default_cache_dir("hub")) / source_key(hub_endpoint(endpoint))
    return root / repo.replace("/", "--") / subset / split


def parquet_verifier(columns: tuple[str, ...] = ()) -> Callable[[Path], None]:
    """A download check: a parquet file with every column in `columns`, whose pages of them (of every column for
    none) all decode."""

    def verify(path: Path) -> None:
        schema = readable_parquet_schema(path)
        missing = [column for column in columns if column not in schema.names]
        if missing:
            raise WrongColumns(f"{path.name} has no column {', '.join(missing)} (columns: {schema.names})")
        check_pages(path, list(columns) or None)

    return verify


def cached_listing(directory: Path, url: str) -> list[str] | None:
    """The file URLs recorded by an earlier call for the same listing URL (the same endpoint), if any."""
    try:
        record = json.loads((directory / LISTING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record["urls"] if record.get("listing_url") == url else None


def download_split(repo: str, subset: str, split: str, endpoint: str = "", cache_dir: Path | None = None,
                   columns: tuple[str, ...] = (), retry: Retry = DEFAULT_RETRY) -> list[Path]:
    """The split's parquet files, verified, on local disk (in listing order). A file that cannot be had raises
    one DownloadError naming it: "<repo> <subset>/<split> file N"."""
    directory = split_cache_dir(repo, subset, split, cache_dir, endpoint)
    url = listing_url(repo, subset, split, endpoint)
    urls = cached_listing(directory, url)
    if urls is None:
        urls = parquet_urls(repo, subset, split, endpoint, retry)
        # recorded before the files: a relaunch after a failed file resumes the same listing, asking nothing
        listing = json.dumps({"listing_url": url, "urls": urls}, indent=1).encode()
        write_bytes_atomically(directory / LISTING_FILE, [listing])
    verify = parquet_verifier(columns)
    stop = threading.Event()  # set by the first failure: the other files stop at their next chunk or retry

    def fetch(index: int) -> Path:
        what = f"{split_name(repo, subset, split)} file {index}"
        return download_file(urls[index], directory / f"{index:05d}.parquet", verify, what, retry, endpoint,
                             stop).path

    with ThreadPoolExecutor(min(DOWNLOAD_WORKERS, len(urls))) as pool:
        futures = [pool.submit(fetch, index) for index in range(len(urls))]
        try:
            for future in as_completed(futures):  # the first file to fail raises its error, whichever it is
                future.result()
        finally:
            stop.set()
            pool.shutdown(cancel_futures=True)
        return [future.result() for future in futures]


def parquet_rows(url: str, what: str, retry: Retry = DEFAULT_RETRY, hub: str = "") -> int | None:
    """The rows of the parquet file at `url`, as its footer records them, read from the file's last bytes (suffix
    Range requests) without downloading it. None where the server sends no such range."""

    def tail(length: int) -> tuple[bytes, int] | None:
        """The last `length` bytes (or fewer: the whole of a shorter file) and the file's size."""
        headers = {**auth_headers(url, hub), "Range": f"bytes=-{length}"}
        with requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT_S) as response:
            if response.status_code == 416:  # as the hub has answered some files' ranges: no count from here
                return None
            raise_for_status(response)
            answered = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            # 200: the whole file was coming; a range that does not end the file is not the one asked for
            if response.status_code != 206 or not answered or int(answered[2]) != int(answered[3]) - 1:
                return None
            return response.content, int(answered[3])

    def attempt() -> int | None:
        if (answer := tail(FOOTER_PROBE_BYTES)) is None:
            return None
        data, size = answer
        footer_length = struct.unpack("<I", data[-8:-4])[0] if len(data) >= 12 and data[-4:] == b"PAR1" else -1
        if not 0 < footer_length <= size - 12:
            raise CorruptFile(f"no parquet footer in its last {len(data):,} of {size:,} bytes")
        if footer_length + 8 > len(data):
            if footer_length > MAX_FOOTER_BYTES or (answer := tail(footer_length + 8)) is None:
                return None
            data = answer[0]
        try:  # the footer alone, behind the leading "PAR1" a file starts with: all that read_metadata reads
            return pq.read_metadata(pa.BufferReader(b"PAR1" + data[-(footer_length + 8):])).num_rows
        except (pa.ArrowException, OSError) as e:
            raise CorruptFile(f"unreadable parquet footer: {e}") from e

    return with_retries(attempt, what, url, retry)


def split_rows(repo: str, subset: str, split: str, endpoint: str = "", cache_dir: Path | None = None,
               retry: Retry = DEFAULT_RETRY) -> int | None:
    """The rows of a split, counted without downloading it: from the files already in the cache (download_split's),
    else from the footers of the files its listing names. None where a server cannot say (parquet_rows)."""
    directory = split_cache_dir(repo, subset, split, cache_dir, endpoint)
    urls = cached_listing(directory, listing_url(repo, subset, split, endpoint))
    if urls is None:
        urls = parquet_urls(repo, subset, split, endpoint, retry)
    rows = 0
    for index, url in enumerate(urls):
        if (counted := cached_rows(directory / f"{index:05d}.parquet")) is None:
            counted = parquet_rows(url, f"{split_name(repo, subset, split)} file {index}", retry, endpoint)
        if counted is None:
            return None
        rows += counted
    return rows


def cached_rows(path: Path) -> int | None:
    """The rows of a file download_split has cached, or None: not there, or damaged since (its next download checks
    it and fetches it again)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):  # (a missing file is an OSError too)
        return None


def file_records(paths: list[Path]) -> list[dict]:
    """For a manifest: each downloaded file's URL (from the split's listing), size and sha256."""
    records = []
    for path in paths:
        urls = json.loads((path.parent / LISTING_FILE).read_text())["urls"]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        records.append({"url": urls[int(path.stem)], "file": path.name, "bytes": path.stat().st_size,
                        "sha256": digest.hexdigest()})
    return records


def iter_rows(paths: list[Path], columns: tuple[str, ...]) -> Iterator[dict]:
    """The rows of the files in order, as dicts of `columns`, a batch of rows in memory at a time."""
    for path in paths:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(ROWS_PER_BATCH, columns=list(columns)):
                yield from batch.to_pylist()
