"""The hub client against a local hub (tests/hub_server.py): the listing API, downloads, faults, cache, HF_TOKEN."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_flyte.data import hub
from nanochat_flyte.data.download import DownloadError, Retry, source_key
from nanochat_flyte.data.hub import (
    download_split,
    file_records,
    hub_endpoint,
    iter_rows,
    parquet_urls,
    split_cache_dir,
    split_rows,
)
from nanochat_flyte.errors import ConfigError
from tests.hub_server import HUB_SPLITS, MMLU_SCHEMA, split_path, write_split

FAST_RETRY = Retry(attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)
MMLU_TEST = ("cais/mmlu", "all", "test")
LISTING = split_path(*MMLU_TEST)
FILE_0 = LISTING + "/0.parquet"


def test_the_endpoint_is_explicit_else_hf_endpoint_else_the_hub(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.com/")
    assert hub_endpoint() == "https://hf-mirror.example.com"
    assert hub_endpoint("http://127.0.0.1:8766/") == "http://127.0.0.1:8766"
    monkeypatch.setenv("HF_ENDPOINT", "ftp://mirror")  # one line, not six attempts without a connection adapter
    with pytest.raises(ConfigError, match=r"^environment\.HF_ENDPOINT: must be an http\(s\) URL, got 'ftp://mirror'"):
        hub_endpoint()


def test_the_listing_names_the_parquet_files_and_they_download_in_the_exact_schema(hub_server, tmp_path):
    repo, subset, split = key = ("HuggingFaceTB/smol-smoltalk", "default", "train")  # two files
    urls = parquet_urls(*key)
    assert urls == [f"{hub_server.url}{split_path(*key)}/{n}.parquet" for n in (0, 1)]

    paths = download_split(*key, cache_dir=tmp_path / "cache", columns=("messages",))

    directory = tmp_path / "cache" / source_key(hub_server.url) / "HuggingFaceTB--smol-smoltalk" / "default" / "train"
    assert paths == [directory / "00000.parquet", directory / "00001.parquet"] == \
           [split_cache_dir(*key, tmp_path / "cache") / name for name in ("00000.parquet", "00001.parquet")]
    schema, rows, _ = HUB_SPLITS[key]
    assert pq.read_schema(paths[0]).equals(schema)
    assert list(iter_rows(paths, ("messages", "source"))) == rows
    assert [r["url"] for r in file_records(paths)] == urls


def test_every_split_reads_back_as_written(hub_server, tmp_path):
    for key, (schema, rows, _) in HUB_SPLITS.items():
        assert list(iter_rows(download_split(*key, cache_dir=tmp_path / "cache"), tuple(schema.names))) == rows, key


def test_a_split_s_rows_are_counted_from_its_files_footers_without_downloading_them(hub_server, tmp_path):
    for key, (_, rows, _) in HUB_SPLITS.items():
        assert split_rows(*key, cache_dir=tmp_path / "cache") == len(rows), key
    files = [request for request in hub_server.requests if request.path.endswith(".parquet")]
    # each file's last 64 KiB (these files are smaller: each comes whole, once), as a suffix range, GET alone: a
    # signed CDN URL may answer only the method it was signed for
    assert {(request.method, request.headers.get("Range")) for request in files} == {("GET", "bytes=-65536")}
    assert len(files) == sum(num_files for *_, num_files in HUB_SPLITS.values())
    assert not (tmp_path / "cache").exists()


def test_a_footer_longer_than_the_first_tail_is_asked_for_again(hub_server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "FOOTER_PROBE_BYTES", 16)  # the footer's length and "PAR1", and a few bytes of it
    assert split_rows(*MMLU_TEST) == len(HUB_SPLITS[MMLU_TEST][1])
    footer = pq.ParquetFile(hub_server.directory / FILE_0.lstrip("/")).metadata.serialized_size
    assert [request.headers["Range"] for request in hub_server.requests_for(FILE_0)] == ["bytes=-16",
                                                                                       f"bytes=-{footer + 8}"]


def test_rows_already_in_the_cache_are_counted_there(hub_server, tmp_path):
    download_split(*MMLU_TEST, cache_dir=tmp_path / "cache")
    asked = len(hub_server.requests)
    assert split_rows(*MMLU_TEST, cache_dir=tmp_path / "cache") == len(HUB_SPLITS[MMLU_TEST][1])
    assert len(hub_server.requests) == asked


def test_a_damaged_file_in_the_cache_is_counted_from_the_hub(hub_server, tmp_path):
    (path,) = download_split(*MMLU_TEST, cache_dir=tmp_path / "cache")
    path.write_bytes(path.read_bytes()[:-20])  # its download will fetch it again
    assert split_rows(*MMLU_TEST, cache_dir=tmp_path / "cache") == len(HUB_SPLITS[MMLU_TEST][1])


def test_a_server_without_such_ranges_cannot_count_rows_and_says_so(hub_server):
    hub_server.supports_range = False  # the whole file: 200
    assert split_rows(*MMLU_TEST) is None
    hub_server.supports_range = True
    hub_server.fail(FILE_0, "416")  # as the hub has answered some ranges
    assert split_rows(*MMLU_TEST) is None
    assert len(hub_server.requests_for(FILE_0)) == 2  # neither is retried


def test_a_footer_too_long_to_be_one_is_not_fetched(hub_server, monkeypatch):
    monkeypatch.setattr(hub, "FOOTER_PROBE_BYTES", 16)
    monkeypatch.setattr(hub, "MAX_FOOTER_BYTES", 100)  # less than the footer's length in the first tail
    assert split_rows(*MMLU_TEST) is None
    assert len(hub_server.requests_for(FILE_0)) == 1


def test_a_listed_file_that_is_no_parquet_fails_its_count_naming_it(hub_server, tmp_path):
    (hub_server.directory / FILE_0.lstrip("/")).write_bytes(b"<html>" + b" " * 100 + b"</html>")
    with pytest.raises(DownloadError, match=r"^cais/mmlu all/test file 0 could not be downloaded from .*: no parquet "
                                            r"footer in its last 113 of 113 bytes \(gave up after 3 attempts\)$"):
        split_rows(*MMLU_TEST, retry=FAST_RETRY)


def test_503_on_the_listing_and_on_a_file_is_retried(hub_server, tmp_path):
    hub_server.fail(LISTING, "503")
    hub_server.fail(FILE_0, "503")
    (path,) = download_split(*MMLU_TEST, cache_dir=tmp_path / "cache", retry=FAST_RETRY)
    assert list(iter_rows([path], ("question",))) == [{"question": r["question"]} for r in HUB_SPLITS[MMLU_TEST][1]]
    assert len(hub_server.requests_for(LISTING)) == 2 and len(hub_server.requests_for(FILE_0)) == 2


def test_a_split_the_hub_does_not_have_fails_in_one_line_naming_it(hub_server, tmp_path):
    with pytest.raises(DownloadError) as error:
        download_split("cais/mmlu", "all", "nonexistent", cache_dir=tmp_path / "cache", retry=FAST_RETRY)
    message = str(error.value)
    assert message == (f"the parquet listing of cais/mmlu all/nonexistent could not be downloaded from "
                       f"{hub_server.url}/api/datasets/cais/mmlu/parquet/all/nonexistent: not found (HTTP 404)")
    assert len(hub_server.requests) == 1  # a 404 is not retried


def test_a_listed_file_that_is_missing_fails_naming_the_dataset_and_file(hub_server, tmp_path):
    hub_server.fail(FILE_0, "404", times=None)
    with pytest.raises(DownloadError) as error:
        download_split(*MMLU_TEST, cache_dir=tmp_path / "cache", retry=FAST_RETRY)
    assert str(error.value) == (f"cais/mmlu all/test file 0 could not be downloaded from {hub_server.url}{FILE_0}: "
                                f"not found (HTTP 404)")


def test_a_file_that_fails_stops_the_splits_other_downloads(hub_server, tmp_path):
    """SmolTalk's file 1 is missing while file 0 waits out a 503's backoff: file 1's error comes at once (map()
    raised it only after file 0's retries), and file 0 is not tried again."""
    key = ("HuggingFaceTB/smol-smoltalk", "default", "train")  # two files
    file_0, file_1 = (f"{split_path(*key)}/{n}.parquet" for n in (0, 1))
    hub_server.fail(file_0, "503", times=None)
    hub_server.fail(file_1, "404", times=None)
    slow_retry = Retry(attempts=3, backoff_base_s=20, backoff_max_s=20)  # at least 10 s before a retry
    start = time.monotonic()
    with pytest.raises(DownloadError, match="file 1 could not be downloaded"):
        download_split(*key, cache_dir=tmp_path / "cache", retry=slow_retry)
    assert time.monotonic() - start < 8
    assert len(hub_server.requests_for(file_0)) <= 1


def test_a_listing_that_is_not_a_list_of_urls_fails_naming_the_split(hub_server, tmp_path):
    bogus = hub_server.directory / split_path("some/dataset", "default", "train").lstrip("/")
    bogus.parent.mkdir(parents=True)
    bogus.write_text(json.dumps({"error": "The dataset viewer is not available for this dataset."}))
    with pytest.raises(DownloadError, match=r"^the parquet listing of some/dataset default/train could not be "
                                            r"downloaded from .*: expected a non-empty JSON list of parquet URLs"):
        parquet_urls("some/dataset", "default", "train", retry=FAST_RETRY)


def test_a_file_without_the_expected_columns_fails_its_check(hub_server, tmp_path):
    table_rows = [{k: v for k, v in row.items() if k != "answer"} for row in HUB_SPLITS[MMLU_TEST][1]]
    write_split(hub_server.directory, "cais/mmlu", "all", "validation", table_rows,
                pa.schema([f for f in MMLU_SCHEMA if f.name != "answer"]))
    with pytest.raises(DownloadError, match=r"^cais/mmlu all/validation file 0 .*has no column answer"):
        download_split("cais/mmlu", "all", "validation", cache_dir=tmp_path / "cache",
                       columns=("question", "answer"), retry=FAST_RETRY)


def test_a_second_call_asks_the_network_nothing_and_a_corrupt_file_is_fetched_again(hub_server, tmp_path):
    first = download_split(*MMLU_TEST, cache_dir=tmp_path / "cache")
    asked = len(hub_server.requests)
    assert asked == 2  # the listing, the file

    assert download_split(*MMLU_TEST, cache_dir=tmp_path / "cache") == first
    assert len(hub_server.requests) == asked

    first[0].write_bytes(first[0].read_bytes()[:100])  # e.g. a disk-full copy
    download_split(*MMLU_TEST, cache_dir=tmp_path / "cache")
    assert [r.path for r in hub_server.requests[asked:]] == [FILE_0]  # the file again; the listing is kept


def test_another_endpoint_lists_and_downloads_again_into_a_folder_of_its_own(hub_server, tmp_path):
    (first,) = download_split(*MMLU_TEST, cache_dir=tmp_path / "cache")
    # the same server under another name: another endpoint, whose files may differ (a mirror, the hub)
    (second,) = download_split(*MMLU_TEST, hub_server.url.replace("127.0.0.1", "localhost"), tmp_path / "cache")
    assert len(hub_server.requests_for(LISTING)) == 2 and len(hub_server.requests_for(FILE_0)) == 2
    assert first.parent != second.parent and first.read_bytes() == second.read_bytes()


def test_hf_token_never_goes_to_a_host_that_the_hubs_listing_names(hub_server, tmp_path, monkeypatch):
    token = "hf_sEcReT0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    endpoint = hub_server.url.replace("127.0.0.1", "localhost")  # the hub: its listing names files on 127.0.0.1
    download_split(*MMLU_TEST, endpoint=endpoint, cache_dir=tmp_path / "cache", retry=FAST_RETRY)
    (listing,) = hub_server.requests_for(LISTING)
    (file,) = hub_server.requests_for(FILE_0)
    assert listing.headers["Authorization"] == f"Bearer {token}" and "Authorization" not in file.headers


def test_hf_token_is_sent_to_the_hub_never_printed_and_not_forwarded_to_another_host(hub_server, tmp_path,
                                                                                     monkeypatch, capsys):
    token = "hf_sEcReT0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    # the hub redirects the file to a CDN: here the same server under another host name
    cdn_path = "/cdn/mmlu-test-0.parquet"
    (hub_server.directory / cdn_path.lstrip("/")).parent.mkdir()
    (hub_server.directory / cdn_path.lstrip("/")).write_bytes((hub_server.directory / FILE_0.lstrip("/")).read_bytes())
    hub_server.fail(FILE_0, "redirect", location=hub_server.url.replace("127.0.0.1", "localhost") + cdn_path)
    hub_server.fail(LISTING, "503")  # a retry prints its cause

    download_split(*MMLU_TEST, cache_dir=tmp_path / "cache", retry=FAST_RETRY)
    with pytest.raises(DownloadError) as error:
        download_split("cais/mmlu", "all", "nonexistent", cache_dir=tmp_path / "cache", retry=FAST_RETRY)

    for request in hub_server.requests_for(LISTING) + hub_server.requests_for(FILE_0):
        assert request.headers["Authorization"] == f"Bearer {token}"
    (cdn_request,) = hub_server.requests_for(cdn_path)
    assert "Authorization" not in cdn_request.headers
    output = capsys.readouterr()
    assert "retrying" in output.out
    assert token not in output.out + output.err + str(error.value)
