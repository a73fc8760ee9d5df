"""Shard download against a local HTTP server with injected faults (never the internet)."""

import dataclasses
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data import download
from nanochat_flyte.data.download import (
    DownloadError,
    Retry,
    check_data_url,
    download_shard,
    download_shards,
    hub_endpoint,
    probe,
    retry_after_seconds,
    shard_url,
    source_key,
    verify_shard,
)
from nanochat_flyte.errors import ConfigError, is_credentials_error, is_storage_error
from tests.shard_server import fineweb_texts, serve_shards, write_fineweb_shard, write_fineweb_shards

FAST_RETRY = Retry(attempts=4, backoff_base_s=0.01, backoff_max_s=0.05)
SHARD_0 = "/shard_00000.parquet"


@pytest.fixture
def shard_0(shard_server):
    """Shard 0 on the server (~100 KB, several row groups); returns its bytes."""
    path = write_fineweb_shard(shard_server.directory / SHARD_0.lstrip("/"), fineweb_texts(200), row_group_size=64)
    return path.read_bytes()


@pytest.mark.parametrize("fault", ["503", "429", "reset", "truncate", "redirect"])
def test_recovers_from_each_recoverable_fault(shard_server, shard_0, tmp_path, fault):
    options = {}
    if fault == "redirect":  # a CDN-like second location for the same file
        (shard_server.directory / "cdn").mkdir()
        (shard_server.directory / "cdn" / SHARD_0.lstrip("/")).write_bytes(shard_0)
        options = {"location": "/cdn" + SHARD_0}
    shard_server.fail(SHARD_0, fault, **options)

    start = time.time()
    download = download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)

    assert download.path.read_bytes() == shard_0
    assert download.path == tmp_path / "cache" / source_key(shard_server.url) / "shard_00000.parquet"
    assert not list((tmp_path / "cache").glob("*/*.part*"))
    requests = shard_server.requests_for(SHARD_0)
    if fault == "redirect":
        assert len(requests) == 1 and len(shard_server.requests_for("/cdn" + SHARD_0)) == 1
    else:
        assert len(requests) == 2
    if fault == "429":  # Retry-After: 1 is honoured, not the 0.05 s backoff
        assert time.time() - start >= 1.0
    if fault in ("reset", "truncate"):  # the second request resumes after the bytes already received
        assert requests[1].headers["Range"].startswith("bytes=")
        assert int(requests[1].headers["Range"][len("bytes="):-1]) > 0
        assert requests[1].headers["If-Range"].startswith('"')  # the ETag of the first answer


def test_a_file_changed_since_the_partial_download_is_fetched_whole_not_spliced(shard_server, shard_0, tmp_path):
    shard_server.fail(SHARD_0, "truncate")
    with pytest.raises(DownloadError):  # one attempt: half of the first version stays as the .part
        download_shard(shard_server.url, 0, tmp_path / "cache", Retry(attempts=1))
    (partial,) = (tmp_path / "cache").glob("*/*.parquet.part")
    partial_bytes = partial.stat().st_size
    assert 0 < partial_bytes < len(shard_0)
    new_version = write_fineweb_shard(shard_server.directory / SHARD_0.lstrip("/"), fineweb_texts(200, seed=1),
                                      row_group_size=64).read_bytes()
    assert len(new_version) > partial_bytes and new_version != shard_0

    download = download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)

    assert download.path.read_bytes() == new_version  # not the first version's bytes with the second's tail
    assert shard_server.requests_for(SHARD_0)[-1].headers["Range"] == f"bytes={partial_bytes}-"  # with If-Range
    assert not list((tmp_path / "cache").glob("*/*.part*"))


def test_each_source_has_its_own_cache_folder(shard_server, shard_0, tmp_path):
    with serve_shards(tmp_path / "other") as other:  # another source with its own shard 0
        other_0 = write_fineweb_shard(other.directory / SHARD_0.lstrip("/"), fineweb_texts(50, seed=2)).read_bytes()
        first = download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
        second = download_shard(other.url, 0, tmp_path / "cache", FAST_RETRY)
        assert len(other.requests_for(SHARD_0)) == 1  # not the first source's cached shard 0
    assert first.path.read_bytes() == shard_0 and second.path.read_bytes() == other_0
    assert first.path.parent != second.path.parent


@pytest.mark.parametrize("header, seconds", [("3", 3.0), ("1.5", 1.5), ("-1", 0.0), ("soon", None), ("", None),
                                             ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
                                             ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0)])
def test_retry_after_is_seconds_or_a_date_and_anything_else_means_the_usual_backoff(header, seconds):
    assert retry_after_seconds(header) == seconds


def test_a_retry_after_longer_than_the_cap_waits_the_cap(shard_server, shard_0, tmp_path):
    shard_server.fail(SHARD_0, "429", retry_after=86400)  # a day
    start = time.time()
    download = download_shard(shard_server.url, 0, tmp_path / "cache",
                              dataclasses.replace(FAST_RETRY, retry_after_max_s=0.5))
    assert download.path.read_bytes() == shard_0 and len(shard_server.requests_for(SHARD_0)) == 2
    assert 0.5 <= time.time() - start < 30


def test_404_fails_at_once_with_shard_url_and_cause(shard_server, shard_0, tmp_path):
    shard_server.fail(SHARD_0, "404", times=None)
    with pytest.raises(DownloadError) as error:
        download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    message = str(error.value)
    assert "shard 0" in message and shard_server.url + SHARD_0 in message and "not found (HTTP 404)" in message
    assert len(shard_server.requests_for(SHARD_0)) == 1  # not retried


@pytest.mark.parametrize("status", ["401", "403"])
def test_a_refused_download_fails_at_once_and_names_the_token(shard_server, shard_0, tmp_path, status):
    shard_server.fail(SHARD_0, status, times=None)
    with pytest.raises(DownloadError, match=rf"shard 0 .*HTTP {status} .*\(a gated or private mirror needs HF_TOKEN\)"):
        download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    assert len(shard_server.requests_for(SHARD_0)) == 1  # not retried


def test_a_partial_file_the_server_cannot_continue_is_started_over(shard_server, shard_0, tmp_path):
    """A .part as long as the file (say, the file was replaced by a shorter one): the server answers 416."""
    partial = tmp_path / "cache" / source_key(shard_server.url) / (SHARD_0.lstrip("/") + ".part")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * (len(shard_0) + 10))
    download = download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    assert download.path.read_bytes() == shard_0 and not partial.exists()
    ranges = [request.headers.get("Range") for request in shard_server.requests_for(SHARD_0)]
    assert ranges == [f"bytes={len(shard_0) + 10}-", None]  # refused (416), then the whole file


def test_gives_up_after_the_retries_with_one_error(shard_server, shard_0, tmp_path):
    shard_server.fail(SHARD_0, "503", times=None)
    with pytest.raises(DownloadError, match=r"shard 0 .*HTTP 503.*after 4 attempts"):
        download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    assert len(shard_server.requests_for(SHARD_0)) == 4


def test_cache_is_reused_and_a_corrupt_cached_file_downloaded_again(shard_server, shard_0, tmp_path, capsys):
    cache = tmp_path / "cache"
    download_shard(shard_server.url, 0, cache, FAST_RETRY)
    again = download_shard(shard_server.url, 0, cache, FAST_RETRY)
    assert again.bytes == 0 and len(shard_server.requests_for(SHARD_0)) == 1

    again.path.write_bytes(shard_0[: len(shard_0) // 2])  # e.g. a disk-full copy
    repaired = download_shard(shard_server.url, 0, cache, FAST_RETRY)
    assert repaired.path.read_bytes() == shard_0
    assert len(shard_server.requests_for(SHARD_0)) == 2
    assert "cached file is corrupt" in capsys.readouterr().out

    damaged = bytearray(shard_0)  # a whole footer on a damaged data page (a bad disk): the footer alone looks fine
    damaged[len(damaged) // 3:len(damaged) // 3 + 64] = bytes(64)
    repaired.path.write_bytes(bytes(damaged))
    assert download_shard(shard_server.url, 0, cache, FAST_RETRY).path.read_bytes() == shard_0
    assert len(shard_server.requests_for(SHARD_0)) == 3 and "damaged data page" in capsys.readouterr().out


def test_a_partial_download_that_is_whole_already_is_kept_not_fetched_again(shard_server, shard_0, tmp_path):
    cache = tmp_path / "cache"
    (cache / source_key(shard_server.url)).mkdir(parents=True)
    # a run stopped between the last byte and the rename: the server answers the Range with 416
    (cache / source_key(shard_server.url) / "shard_00000.parquet.part").write_bytes(shard_0)
    assert download_shard(shard_server.url, 0, cache, FAST_RETRY).path.read_bytes() == shard_0
    (request,) = shard_server.requests_for(SHARD_0)
    assert request.headers["Range"] == f"bytes={len(shard_0)}-"


@pytest.mark.parametrize("supports_range", [True, False])
def test_resumes_a_partial_download_with_range(shard_server, shard_0, tmp_path, supports_range):
    shard_server.supports_range = supports_range
    cache = tmp_path / "cache"
    (cache / source_key(shard_server.url)).mkdir(parents=True)
    (cache / source_key(shard_server.url) / "shard_00000.parquet.part").write_bytes(shard_0[:1000])  # left by a run

    download = download_shard(shard_server.url, 0, cache, FAST_RETRY)

    assert download.path.read_bytes() == shard_0
    (request,) = shard_server.requests_for(SHARD_0)
    assert request.headers["Range"] == "bytes=1000-"
    assert download.bytes == len(shard_0)  # the whole file is on disk either way


def test_local_path_file_url_and_fsspec_url(tmp_path):
    (source,) = write_fineweb_shards(tmp_path / "data", [3], docs_per_shard=50)
    for data_url in (str(tmp_path / "data"), (tmp_path / "data").as_uri()):
        download = download_shard(data_url, 3, tmp_path / "cache")
        assert download.path == source  # read in place, not copied
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/shard_00003.parquet", source.read_bytes())
    try:
        download = download_shard("memory://bucket", 3, tmp_path / "cache")
        assert download.path == tmp_path / "cache" / source_key("memory://bucket") / "shard_00003.parquet"
        assert download.path.read_bytes() == source.read_bytes()
        with pytest.raises(DownloadError, match="shard 4 .*memory://bucket/shard_00004.parquet.*not found"):
            download_shard("memory://bucket", 4, tmp_path / "cache")
    finally:
        fs.rm("/bucket", recursive=True)


def test_an_fsspec_download_resumes_only_the_object_its_bytes_came_from(tmp_path):
    """A partial download of an object that has changed since is fetched whole again, never spliced onto."""
    (old,) = write_fineweb_shards(tmp_path / "old", [3], docs_per_shard=50)
    (new,) = write_fineweb_shards(tmp_path / "new", [3], docs_per_shard=60)
    fs = fsspec.filesystem("memory")
    cached = tmp_path / "cache" / source_key("memory://bucket") / "shard_00003.parquet"
    partial = cached.with_name(cached.name + ".part")
    try:
        fs.pipe("/bucket/shard_00003.parquet", old.read_bytes())
        cached.parent.mkdir(parents=True)
        partial.write_bytes(old.read_bytes()[:1000])  # an earlier attempt's first bytes, with their version
        partial.with_name(partial.name + ".validator").write_text(fs.ukey("/bucket/shard_00003.parquet"))
        assert download_shard("memory://bucket", 3, tmp_path / "cache").path.read_bytes() == old.read_bytes()

        cached.unlink()
        partial.write_bytes(old.read_bytes()[:1000])
        partial.with_name(partial.name + ".validator").write_text(fs.ukey("/bucket/shard_00003.parquet"))
        fs.pipe("/bucket/shard_00003.parquet", new.read_bytes())  # the object changes between two attempts
        assert download_shard("memory://bucket", 3, tmp_path / "cache").path.read_bytes() == new.read_bytes()
        assert not partial.exists() and not partial.with_name(partial.name + ".validator").exists()
    finally:
        fs.rm("/bucket", recursive=True)


def test_local_corrupt_shard_fails_clearly(tmp_path):
    (tmp_path / "shard_00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DownloadError, match="shard 0 .*not a readable parquet file"):
        download_shard(str(tmp_path), 0)


def test_a_missing_local_shard_is_not_found_not_corrupt(tmp_path):
    with pytest.raises(DownloadError, match="shard 0 .*: not found$"):
        download_shard(str(tmp_path), 0)


def test_shard_without_text_column_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no `text` string column"):
        verify_shard(tmp_path / "bad.parquet")


def test_a_served_shard_without_text_column_is_refused_after_one_download(shard_server, tmp_path):
    # Another download brings the same file: no retries, and nothing of it is left in the cache.
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", "b"]}), shard_server.directory / SHARD_0.lstrip("/"))
    with pytest.raises(DownloadError, match="^shard 0 could not be downloaded from .*no `text` string column"):
        download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    assert len(shard_server.requests_for(SHARD_0)) == 1
    assert not list((tmp_path / "cache").glob("*/*"))


def test_hf_token_is_sent_but_never_printed(shard_server, shard_0, tmp_path, monkeypatch, capsys, caplog):
    token = "hf_secretTOKEN123"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", shard_server.url)  # the shards are on the hub's host (a gated mirror)
    shard_server.fail(SHARD_0, "503")  # a retry line gets printed
    download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    shard_server.fail("/shard_00001.parquet", "404")
    with pytest.raises(DownloadError) as error:
        download_shard(shard_server.url, 1, tmp_path / "cache", FAST_RETRY)

    assert all(r.headers["Authorization"] == f"Bearer {token}" for r in shard_server.requests)
    output = capsys.readouterr()
    assert "attempt 1/4 failed" in output.out
    assert token not in output.out + output.err + caplog.text + str(error.value)


def test_hf_token_goes_to_the_hubs_host_only(shard_server, shard_0, tmp_path, monkeypatch):
    """A data_url on another server than the hub (here huggingface.co), or the CORE bundle's host, never sees the
    token: only the hub's own host does."""
    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    download_shard(shard_server.url, 0, tmp_path / "cache", FAST_RETRY)
    assert probe(shard_url(shard_server.url, 0)) is None
    assert len(shard_server.requests) == 2 and all("Authorization" not in r.headers for r in shard_server.requests)


def test_parallel_downloads_report_progress_and_fail_loudly(shard_server, tmp_path, capsys):
    write_fineweb_shards(shard_server.directory, [0, 1, 2], docs_per_shard=50)
    downloads = list(download_shards(shard_server.url, [0, 1, 2], tmp_path / "cache", workers=2, retry=FAST_RETRY))
    assert sorted(index for index, _ in downloads) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "download: 3/3 shards" in out and "MB/s" in out and "ETA" in out

    shard_server.fail("/shard_00003.parquet", "404")
    with pytest.raises(DownloadError, match="shard 3 "):
        list(download_shards(shard_server.url, [0, 1, 2, 3], tmp_path / "cache2", workers=2, retry=FAST_RETRY))


def test_a_failed_shard_stops_the_running_downloads(shard_server, tmp_path):
    """Shard 0 is missing while shard 1 waits out a 503's backoff: the error comes at once, and shard 1 is not
    tried again (it used to hold the error back for its whole backoff and retries)."""
    write_fineweb_shards(shard_server.directory, [1], docs_per_shard=5)
    shard_server.fail("/shard_00001.parquet", "503", times=None)
    slow_retry = Retry(attempts=3, backoff_base_s=20, backoff_max_s=20)  # at least 10 s before a retry
    start = time.monotonic()
    with pytest.raises(DownloadError, match="shard 0 "):
        list(download_shards(shard_server.url, [0, 1], tmp_path / "cache", workers=2, retry=slow_retry))
    assert time.monotonic() - start < 8
    assert len(shard_server.requests_for("/shard_00001.parquet")) <= 1


def test_check_data_url(shard_server, tmp_path):
    write_fineweb_shards(shard_server.directory, [0, 1822], docs_per_shard=5)
    check_data_url(RunConfig(data_url=shard_server.url, num_shards=1))  # reachable: no error
    check_data_url(RunConfig(data_url=str(shard_server.directory), num_shards=1))

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    for data_url in (f"http://127.0.0.1:{closed_port}/data", shard_server.url + "/missing", str(tmp_path / "nowhere")):
        with pytest.raises(ConfigError, match="unreachable") as error:
            check_data_url(RunConfig(data_url=data_url, num_shards=1))
        assert error.value.field == "data_url" and data_url in str(error.value)


@pytest.mark.parametrize("serve", ["http", "local"])
def test_every_requested_shard_is_probed_before_any_download(shard_server, serve):
    write_fineweb_shards(shard_server.directory, [*range(8), 1822], docs_per_shard=2)
    data_url = shard_server.url if serve == "http" else str(shard_server.directory)
    with pytest.raises(ConfigError) as error:
        check_data_url(RunConfig(data_url=data_url, num_shards=20))
    assert str(error.value) == "RunConfig.num_shards: data_url has shards 0..7; num_shards=20 needs 0..19 " \
                               "(not found: 8..19)"
    if serve == "http":  # HEAD requests only: nothing was downloaded
        assert {r.method for r in shard_server.requests} == {"HEAD"} and len(shard_server.requests) == 21

    (shard_server.directory / "shard_01822.parquet").unlink()
    with pytest.raises(ConfigError, match=r"^RunConfig\.val_shard: data_url has no shard 1822 \(not found"):
        check_data_url(RunConfig(data_url=data_url, num_shards=8))


def test_a_num_shards_far_beyond_the_source_stops_probing_after_the_first_batch_that_misses_one(monkeypatch):
    """(Every shard named was probed, from a list of them all: num_shards=100000000 ran ~90 s into a MemoryError.)"""
    probed, has = [], {0, 1, 99_999}

    def fake_probe(url: str) -> str | None:
        probed.append(url)
        return None if int(url.rsplit("_", 1)[1].split(".")[0]) in has else "not found"

    monkeypatch.setattr(download, "probe", fake_probe)
    with pytest.raises(ConfigError) as error:
        check_data_url(RunConfig(data_url="/data/mine", num_shards=99_999, val_shard=99_999))
    assert str(error.value) == ("RunConfig.num_shards: data_url has shards 0..1; num_shards=99999 needs 0..99998 "
                                "(not found: 2..1023; 1024..99998 not probed)")
    assert len(probed) == download.PROBE_BATCH + 1  # one batch, and the validation shard

    probed.clear()
    has = set(range(2_500)) | {99_999}  # every shard there: all of them probed, batch after batch
    check_data_url(RunConfig(data_url="/data/mine", num_shards=2_500, val_shard=99_999))
    assert sorted(probed) == sorted(shard_url("/data/mine", index) for index in has)


def test_an_hf_endpoint_without_a_host_is_named_where_it_was_set(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://")  # (was taken as the hub at "http:")
    with pytest.raises(ConfigError, match=r"^environment\.HF_ENDPOINT: must be an http\(s\) URL, got 'http://' "
                                          r"\(no host\)$"):
        hub_endpoint()
    with pytest.raises(ConfigError, match=r"^config\.hf_endpoint: must be an http\(s\) URL, got 'https://' "):
        hub_endpoint("https://")  # (a config's is checked with it: ChatStageConfig.validate_shared)


def test_an_object_store_without_credentials_is_named_as_data_url_at_once(monkeypatch):
    """(botocore's NoCredentialsError is no OSError: it left the probe as a line that named no field.)"""
    class NoCredentialsError(Exception):  # botocore's, by name: is_credentials_error knows it so
        pass

    class StoreWithoutCredentials:
        calls = 0

        def exists(self, path):
            StoreWithoutCredentials.calls += 1
            raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url: (StoreWithoutCredentials(), url))
    with pytest.raises(ConfigError, match=r"^RunConfig\.data_url: 's3://bucket/data' is unreachable \(probed "
                                          r"s3://bucket/data/shard_00000\.parquet\): Unable to locate credentials for "
                                          r"an object store URI"):
        check_data_url(RunConfig(data_url="s3://bucket/data", num_shards=1))
    assert StoreWithoutCredentials.calls <= 2  # each shard asked once at most: no other attempt finds credentials


class RefusesEveryone(http.server.BaseHTTPRequestHandler):
    """A Google Cloud Storage endpoint that answers 401 to everything, as GCS answers a caller without access."""

    def do_GET(self):
        body = json.dumps({"error": {"code": 401, "message": "Anonymous caller has no access"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


PROBE_GS = """
import logging
logging.basicConfig()  # where gcsfs's records, and the tracebacks they carry, would show
from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.download import check_data_url
try:
    check_data_url(RunConfig(data_url="gs://bucket/shards", num_shards=1))
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def test_a_gs_data_url_that_refuses_the_caller_is_one_line_naming_data_url():
    """gcsfs raises a 401 as its own HttpError, no OSError: the probe let it out as a 30-line traceback, after gcsfs
    had logged the same traceback. (In a process of its own: once flyte is imported, obstore serves gs:// instead.)"""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusesEveryone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gcs = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"}  # gcsfs's endpoint
    try:
        result = subprocess.run([sys.executable, "-c", PROBE_GS], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **gcs}, cwd=Path(__file__).resolve().parents[1])
    finally:
        server.shutdown()
    assert re.fullmatch(r"ConfigError: RunConfig\.data_url: 'gs://bucket/shards' is unreachable \(probed "
                        r"gs://bucket/shards/shard_00000\.parquet\): Anonymous caller has no access, 401 for an object "
                        r"store URI .*GOOGLE_APPLICATION_CREDENTIALS.*\n", result.stdout), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_gcsfs_http_errors_are_storage_hiccups_or_missing_credentials():
    from gcsfs.retry import HttpError

    unavailable, refused = HttpError({"code": 503, "message": "Backend Error"}), HttpError({"code": 401})
    assert is_storage_error(unavailable) and not is_credentials_error(unavailable)
    assert is_credentials_error(refused) and not is_storage_error(refused)
    assert not is_storage_error(HttpError({"code": 400, "message": "Bad Request"}))  # no retry mends the request


def test_a_server_error_while_probing_is_unreachable_not_missing(shard_server):
    write_fineweb_shards(shard_server.directory, [0, 1822], docs_per_shard=2)
    shard_server.fail("/shard_00000.parquet", "503", times=None)
    with pytest.raises(ConfigError, match=r"RunConfig\.data_url: .* is unreachable .*shard_00000.*HTTP 503"):
        check_data_url(RunConfig(data_url=shard_server.url, num_shards=1))
