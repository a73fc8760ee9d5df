"""Tokenization into uint16 token files and the data directory (manifest.json), on small generated shards."""

import dataclasses
import hashlib
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nanochat_flyte.cli.prepare import main as prepare_main
from nanochat_flyte.cli.train import main as train_main
from nanochat_flyte.config import RunConfig
from nanochat_flyte.data import prepare
from nanochat_flyte.data.dataloader import shard_files
from nanochat_flyte.data.prepare import (
    ShardJob,
    build_tokenizer,
    merge_prepared,
    plan_jobs,
    plan_shards,
    prepare_data,
    prepare_jobs,
    prepare_shard,
    tokenize_shard,
)
from nanochat_flyte.data.tokenizer import gpt2_tokenizer, load_tokenizer
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.pipeline.prepare import data_config
from tests.helpers import NANOCHAT
from tests.shard_server import fineweb_texts, write_fineweb_shard, write_fineweb_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS_PER_SHARD = 60  # ~30k GPT-2 tokens per shard
SHARD_KEYS = ["shard", "file", "tokens", "documents", "characters", "utf8_bytes", "sha256", "source",
              "download_seconds", "tokenize_seconds"]


def small_config(data_url: str, **overrides) -> RunConfig:
    """A run of 10 steps of 1 x 64 tokens over 2 train shards + validation shard 5."""
    values = dict(data_url=data_url, num_shards=2, val_shard=5, max_seq_len=64, device_batch_size=1,
                  total_batch_size=64, num_iterations=10, eval_tokens=1024, download_workers=2)
    return RunConfig(**(values | overrides)).validate()


def expected_tokens(texts: list[str], enc) -> np.ndarray:
    return np.array([t for text in texts for t in [enc.eot_token, *enc.encode_ordinary(text)]], dtype=np.uint16)


def split_documents(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    assert tokens[0] == eot
    return np.split(tokens, np.flatnonzero(tokens == eot))[1:]


def test_token_ids_are_exactly_encode_ordinary(tmp_path):
    texts = fineweb_texts(150) + ["", "a literal <|endoftext|> stays text", "Zürich 東京 🦜 \n\n\t 12345"]
    shard = write_fineweb_shard(tmp_path / "shard_00000.parquet", texts, row_group_size=32)
    enc = gpt2_tokenizer()

    stats = tokenize_shard(shard, enc, tmp_path / "shard_00000.bin", num_threads=2)

    tokens = np.fromfile(tmp_path / "shard_00000.bin", dtype="<u2")
    np.testing.assert_array_equal(tokens, expected_tokens(texts, enc))
    assert stats == {"tokens": len(tokens), "documents": len(texts), "characters": sum(map(len, texts)),
                     "utf8_bytes": sum(len(t.encode()) for t in texts),
                     "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}


def test_prepare_data_writes_the_data_directory(shard_server, tmp_path, capsys):
    write_fineweb_shards(shard_server.directory, [0, 1, 5], DOCS_PER_SHARD)
    config = small_config(shard_server.url, num_iterations=2000)  # 128k tokens: more than the 2 shards hold
    data = tmp_path / "data"

    manifest = prepare_data(config, data, cache_dir=tmp_path / "cache")

    assert json.loads((data / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "tokenizer", "train", "val"]
    assert manifest["tokenizer"]["name"] == "gpt2"
    # GPT-2's 50257 tokens, then the chat tokens 50257..50264
    assert (manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eot_id"]) == (50265, 50256)
    assert 3 < manifest["tokenizer"]["val_bytes_per_token"] < 6
    assert [s["shard"] for s in manifest["train"]] == [0, 1] and [s["shard"] for s in manifest["val"]] == [5]
    enc = load_tokenizer(data / "tokenizer")
    for shard in manifest["train"] + manifest["val"]:
        assert list(shard)[:len(SHARD_KEYS)] == SHARD_KEYS
        assert shard["source"] == f"{shard_server.url}/shard_{shard['shard']:05d}.parquet"
        tokens = np.fromfile(data / shard["file"], dtype="<u2")
        assert len(tokens) == shard["tokens"] and shard["documents"] == DOCS_PER_SHARD
        assert hashlib.sha256(tokens.tobytes()).hexdigest() == shard["sha256"]
        np.testing.assert_array_equal(tokens, expected_tokens(fineweb_texts(DOCS_PER_SHARD, shard["shard"]), enc))
    assert manifest["train_tokens"] == sum(s["tokens"] for s in manifest["train"])
    assert manifest["val_tokens"] == manifest["val"][0]["tokens"]
    assert "tokens_needed" not in manifest and "epochs" not in manifest  # the directory serves runs of any length
    out = capsys.readouterr().out
    assert "download: 1/1 shards" in out and "download: 2/2 shards" in out  # the validation shard first
    assert f"data will repeat ({128_000 / manifest['train_tokens']:.2f} epochs)" in out  # this run's share


def test_a_run_on_a_data_directory_names_the_source_it_was_prepared_from(shard_server, tmp_path):
    """The checkpoint's config.json, which a resume is checked against before any download, must name the data the
    run trained on: a config that names another source is refused before training, with the value to give."""
    write_fineweb_shards(shard_server.directory, [0, 1, 5], DOCS_PER_SHARD)
    config = small_config(shard_server.url)
    manifest = prepare_data(config, tmp_path / "data", cache_dir=tmp_path / "cache")
    assert manifest["source"] == {"data_url": shard_server.url, "num_shards": 2, "val_shard": 5,
                                  "only_needed_shards": False}
    # overrides before and after the flags, as a user may write them
    run = ["depth=1", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "num_iterations=1",
           "max_seq_len=64", "device_batch_size=1", "total_batch_size=64", "eval_tokens=1024", "eval_every=1",
           "sample_every=1", "sample_max_tokens=1", "wandb_mode=disabled"]
    for data_url, val_shard, problem in ((f"{shard_server.url}/other", 5, "data_url"),
                                         (shard_server.url, 7, "val_shard")):
        values = [f"data_url={data_url}", "num_shards=2", f"val_shard={val_shard}"]
        with pytest.raises(ConfigError, match=rf"^RunConfig\.{problem}: .* but the data in .*data was prepared with "
                                              rf"{problem}=.*: give {problem}="):
            train_main([*run, *values])
        assert not (tmp_path / "run").exists()
    train_main([*run, f"data_url={shard_server.url}/", "num_shards=2", "val_shard=5"])  # the same URL, written so
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_url"] == shard_server.url + "/"

    # The cluster path (one prepare_shard per pod, then merge) builds the same data directory, from the config the
    # workflows give their data tasks: the run's data fields alone (their cache key)
    tokenizer_dir = build_tokenizer(config, tmp_path / "tokenizer")
    parts = []
    for job in plan_shards(data_config(config), "gpt2"):
        part = tmp_path / "parts" / f"{job.split}_{job.index}"
        stats = prepare_shard(job, tokenizer_dir, part, cache_dir=tmp_path / "cache")
        assert json.loads((part / "stats.json").read_text()) == stats
        parts.append(part)
    cluster = merge_prepared(data_config(config), parts, tokenizer_dir, tmp_path / "cluster_data")
    for split in ("train", "val"):
        assert [s["sha256"] for s in cluster[split]] == [s["sha256"] for s in manifest[split]]
    for key in ("train_tokens", "val_tokens", "tokenizer"):
        assert cluster[key] == manifest[key], key


def test_the_data_tasks_config_changes_with_the_data_only():
    """A relaunch (a new run name), other rates, another W&B project or a longer run keep the data tasks' inputs,
    and so their cache; the data's source changes them, and the run's length does with only_needed_shards."""
    config = RunConfig(num_shards=4).resolved()
    relaunch = dataclasses.replace(config.resolved(), run_name="other", matrix_lr=0.05, wandb_project="p", depth=12,
                                   num_iterations=2000, total_batch_size=2 * config.total_batch_size)
    assert data_config(relaunch) == data_config(config) != config
    for change in (dict(num_shards=5), dict(data_url="s3://b/fineweb"), dict(tokenizer="bpe"),
                   dict(eval_tokens=1024)):
        assert data_config(dataclasses.replace(config, **change)) != data_config(config), change
    needed = dataclasses.replace(config, only_needed_shards=True)
    assert data_config(dataclasses.replace(needed, num_iterations=2000)) != data_config(needed)


def test_only_needed_shards(shard_server, tmp_path):
    write_fineweb_shards(shard_server.directory, [0, 1, 2, 3, 5], DOCS_PER_SHARD)
    shard_0_tokens = len(expected_tokens(fineweb_texts(DOCS_PER_SHARD, 0), gpt2_tokenizer()))
    steps = math.ceil(1.5 * shard_0_tokens / 64)  # one and a half shards of 64-token steps
    config = small_config(shard_server.url, num_shards=4, num_iterations=steps, only_needed_shards=True)

    manifest = prepare_data(config, tmp_path / "data", cache_dir=tmp_path / "cache")

    assert [s["shard"] for s in manifest["train"]] == [0, 1]
    assert not shard_server.requests_for("/shard_00002.parquet")
    assert not shard_server.requests_for("/shard_00003.parquet")
    assert [job.index for job in plan_shards(config, "gpt2", first_shard_tokens=shard_0_tokens)] == [0, 1, 5]
    assert [job.index for job in plan_shards(config, "gpt2")] == [0, 1, 2, 3, 5]  # shard 0's size not known yet
    # The cluster plan counts shard 0 itself, before any shard pod runs.
    jobs = plan_jobs(data_config(config), build_tokenizer(config, tmp_path / "tokenizer"), cache_dir=tmp_path / "cache")
    assert [(job.index, job.tokenizer) for job in jobs] == [(0, "gpt2"), (1, "gpt2"), (5, "gpt2")]


def test_a_second_prepare_into_the_same_directory_fails_in_one_line_and_leaves_the_first_alone(shard_server, tmp_path):
    write_fineweb_shards(shard_server.directory, [0, 1, 5], DOCS_PER_SHARD)
    out = tmp_path / "data"
    (out / "parts").mkdir(parents=True)
    with open(out / "parts" / ".lock", "w") as first:  # a prepare into out, running in another process
        prepare.fcntl.flock(first, prepare.fcntl.LOCK_EX | prepare.fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"prepare.out_dir: another prepare is writing into .*data' now"):
            prepare_data(small_config(shard_server.url), out, cache_dir=tmp_path / "cache")
        assert shard_server.requests == []  # before any download
    prepare_data(small_config(shard_server.url), out, cache_dir=tmp_path / "cache")  # once the other has ended
    assert (out / "manifest.json").exists() and not (out / "parts").exists()


def test_a_bpe_that_learns_fewer_tokens_than_asked_for_is_refused_and_an_out_dir_under_a_file_is_one_line(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0, 5], DOCS_PER_SHARD)
    config = small_config(str(tmp_path / "shards"), num_shards=1, tokenizer="bpe", bpe_vocab_size=4096,
                          bpe_train_chars=2_000)
    with pytest.raises(ConfigError, match=r"^RunConfig\.bpe_train_chars: 2,000 characters of train text taught \d+ "
                                          r"of the 4,096 tokens asked for"):
        build_tokenizer(config, tmp_path / "tokenizer")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^prepare\.out_dir: cannot create .*file/data': Not a directory"):
        prepare_data(small_config(str(tmp_path / "shards"), num_shards=1), tmp_path / "file" / "data")


def test_bpe_data_directory(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0, 1, 5], DOCS_PER_SHARD)
    config = small_config(str(tmp_path / "shards"), tokenizer="bpe", bpe_vocab_size=512, bpe_train_chars=100_000)

    manifest = prepare_data(config, tmp_path / "data")

    tokenizer = manifest["tokenizer"]
    # 503 ordinary tokens, then the 9 special ones
    assert (tokenizer["name"], tokenizer["vocab_size"], tokenizer["eot_id"]) == ("bpe", 512, 503)
    # A 512-token BPE compresses less than GPT-2's 50257 ordinary tokens, both measured on the validation shard.
    assert 1 < tokenizer["val_bytes_per_token"] < tokenizer["gpt2_val_bytes_per_token"]
    enc = load_tokenizer(tmp_path / "data" / "tokenizer")
    tokens = np.fromfile(tmp_path / "data" / "val" / "shard_00005.bin", dtype="<u2")
    assert tokens.max() == 503
    assert [enc.decode(doc[1:].tolist()) for doc in split_documents(tokens, 503)] == fineweb_texts(DOCS_PER_SHARD, 5)


def test_an_offline_bpe_run_keeps_its_tokenizer_without_gpt2s_comparison(tmp_path, monkeypatch, capsys):
    # GPT-2's ranks only give the compression a comparison: without them (no cache, no network) the BPE, trained
    # first, is not thrown away at the validation shard.
    import socket

    import tiktoken

    write_fineweb_shards(tmp_path / "shards", [0, 1, 5], DOCS_PER_SHARD)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "r50k_base", raising=False)  # tiktoken's in-process cache

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    config = small_config(str(tmp_path / "shards"), tokenizer="bpe", bpe_vocab_size=512, bpe_train_chars=100_000)

    tokenizer = prepare_data(config, tmp_path / "data")["tokenizer"]

    assert tokenizer["name"] == "bpe" and 1 < tokenizer["val_bytes_per_token"]
    assert "gpt2_val_bytes_per_token" not in tokenizer
    assert "note: no GPT-2 compression to compare with: GPT-2's ranks" in capsys.readouterr().out


def test_merge_leaves_the_parts_for_a_second_merge(tmp_path):
    # In a local Flyte run the parts are cached outputs of prepare_data_shard: the next run merges them again.
    write_fineweb_shards(tmp_path / "shards", [0, 5], DOCS_PER_SHARD)
    config = small_config(str(tmp_path / "shards"), num_shards=1)
    tokenizer_dir = build_tokenizer(config, tmp_path / "tokenizer")
    for job in plan_shards(config, "gpt2"):
        prepare_shard(job, tokenizer_dir, tmp_path / job.split)
    parts = [tmp_path / "train", tmp_path / "val"]

    first = merge_prepared(config, parts, tokenizer_dir, tmp_path / "run1")
    second = merge_prepared(config, parts, tokenizer_dir, tmp_path / "run2")
    assert first == second
    for entry in first["train"] + first["val"]:
        assert (tmp_path / "run1" / entry["file"]).read_bytes() == (tmp_path / "run2" / entry["file"]).read_bytes()


def test_merging_again_into_the_same_directory_replaces_its_files_and_leaves_the_earlier_parts(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0, 5], DOCS_PER_SHARD)
    write_fineweb_shards(tmp_path / "other", [0, 5], DOCS_PER_SHARD, seed=1)
    config = small_config(str(tmp_path / "shards"), num_shards=1)
    tokenizer_dir = build_tokenizer(config, tmp_path / "tokenizer")

    def parts_of(data_url: str, folder: str) -> list[Path]:
        jobs = plan_shards(dataclasses.replace(config, data_url=data_url), "gpt2")
        return [prepare_shard(job, tokenizer_dir, tmp_path / folder / job.split) and tmp_path / folder / job.split
                for job in jobs]

    first, second = parts_of(str(tmp_path / "shards"), "first"), parts_of(str(tmp_path / "other"), "second")
    first_train = (first[0] / "train" / "shard_00000.bin").read_bytes()
    merge_prepared(config, first, tokenizer_dir, tmp_path / "data")
    merge_prepared(config, first, tokenizer_dir, tmp_path / "data")  # the same parts again: a relaunch
    manifest = merge_prepared(config, second, tokenizer_dir, tmp_path / "data")  # other parts: hard links replaced

    assert (tmp_path / "data" / "train" / "shard_00000.bin").read_bytes() == \
           (second[0] / "train" / "shard_00000.bin").read_bytes() != first_train
    assert (first[0] / "train" / "shard_00000.bin").read_bytes() == first_train  # the earlier part is untouched
    assert manifest["train"][0]["sha256"] == hashlib.sha256((second[0] / "train" / "shard_00000.bin")
                                                            .read_bytes()).hexdigest()


def test_merging_fewer_shards_into_a_data_directory_leaves_none_of_the_earlier_ones(tmp_path):
    """A shard tokenized before, which the new manifest leaves out, does not stay beside it (with another tokenizer's
    token ids)."""
    write_fineweb_shards(tmp_path / "shards", [0, 1, 5], DOCS_PER_SHARD)
    tokenizer_dir = build_tokenizer(small_config(str(tmp_path / "shards")), tmp_path / "tokenizer")
    for num_shards in (2, 1):
        config = small_config(str(tmp_path / "shards"), num_shards=num_shards)
        parts = []
        for job in plan_shards(config, "gpt2"):
            prepare_shard(job, tokenizer_dir, tmp_path / f"parts{num_shards}" / job.name)
            parts.append(tmp_path / f"parts{num_shards}" / job.name)
        manifest = merge_prepared(config, parts, tokenizer_dir, tmp_path / "data")
    assert sorted(path.name for path in (tmp_path / "data" / "train").iterdir()) == ["shard_00000.bin"]
    assert [entry["file"] for entry in manifest["train"]] == ["train/shard_00000.bin"]


def test_a_prepare_that_fails_over_a_data_directory_leaves_it_whole(tmp_path, monkeypatch):
    write_fineweb_shards(tmp_path / "shards", [0, 5], DOCS_PER_SHARD)
    config = small_config(str(tmp_path / "shards"), num_shards=1)
    prepare_data(config, tmp_path / "data")
    before = {path: path.read_bytes() for path in (tmp_path / "data").rglob("*") if path.is_file()}
    # again with a BPE tokenizer, failing after the tokenizer is trained: the validation shard is too small, which
    # is found before any train shard is downloaded
    downloaded = []
    monkeypatch.setattr(prepare, "prepare_jobs", lambda config, jobs, *args: downloaded.extend(jobs) or
                        prepare_jobs(config, jobs, *args))
    with pytest.raises(ConfigError, match="eval_tokens"):
        prepare_data(dataclasses.replace(config, tokenizer="bpe", bpe_vocab_size=512, bpe_train_chars=50_000,
                                         eval_tokens=10**9), tmp_path / "data")
    assert [job.split for job in downloaded] == ["val"]
    # the earlier directory is as it was: its manifest, gpt2 tokenizer and token files
    assert {path: path.read_bytes() for path in (tmp_path / "data").rglob("*")
            if path.is_file() and "parts" not in path.parts} == before
    assert json.loads((tmp_path / "data" / "tokenizer" / "tokenizer.json").read_text())["name"] == "gpt2"
    assert shard_files(tmp_path / "data", "train")
    # and a prepare that succeeds replaces it whole, its tokenizer folder too
    prepare_data(dataclasses.replace(config, tokenizer="bpe", bpe_vocab_size=512, bpe_train_chars=50_000),
                 tmp_path / "data")
    assert json.loads((tmp_path / "data" / "tokenizer" / "tokenizer.json").read_text())["name"] == "bpe"
    assert not (tmp_path / "data" / "parts").exists()


def test_a_row_group_without_documents_has_no_tokens_and_a_null_document_is_named(tmp_path):
    enc = gpt2_tokenizer()
    empty = write_fineweb_shard(tmp_path / "shard_00000.parquet", [])
    assert tokenize_shard(empty, enc, tmp_path / "shard_00000.bin")["tokens"] == 0
    shard = write_fineweb_shard(tmp_path / "shard_00001.parquet", ["a document", None, "another"])
    with pytest.raises(ConfigError, match=r"data_url: shard_00001.parquet: row group 0 has 1 documents without"):
        tokenize_shard(shard, enc, tmp_path / "shard_00001.bin")


def test_a_shard_without_documents_is_refused_at_the_merge(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [5], DOCS_PER_SHARD)
    write_fineweb_shard(tmp_path / "shards" / "shard_00000.parquet", [])
    config = small_config(str(tmp_path / "shards"), num_shards=1)
    with pytest.raises(ConfigError, match=r"RunConfig.data_url: shard 0 \(.*shard_00000.parquet\) has no documents"):
        prepare_data(config, tmp_path / "data")


def test_merge_checks_its_inputs_before_writing_anything(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0, 5], DOCS_PER_SHARD)
    config = small_config(str(tmp_path / "shards"), num_shards=1)
    tokenizer_dir = build_tokenizer(config, tmp_path / "tokenizer")
    train, val = (prepare_shard(job, tokenizer_dir, tmp_path / job.split) for job in plan_shards(config, "gpt2"))
    parts = [tmp_path / "train", tmp_path / "val"]

    with pytest.raises(ValueError, match="no val shard"):
        merge_prepared(config, parts[:1], tokenizer_dir, tmp_path / "data")
    with pytest.raises(ConfigError, match="eval_tokens"):
        merge_prepared(dataclasses.replace(config, eval_tokens=val["tokens"] + 1), parts, tokenizer_dir,
                       tmp_path / "data")
    bin_file = tmp_path / "train" / train["file"]
    bin_file.write_bytes(bin_file.read_bytes()[:-2])  # e.g. a partial upload
    with pytest.raises(ValueError, match=f"holds {2 * train['tokens'] - 2} bytes"):
        merge_prepared(config, parts, tokenizer_dir, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_shard_job_must_match_the_tokenizer(tmp_path):
    write_fineweb_shards(tmp_path / "shards", [0], 5)
    tokenizer_dir = build_tokenizer(small_config(str(tmp_path / "shards")), tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="asks for tokenizer 'bpe'"):
        prepare_shard(ShardJob(0, "train", str(tmp_path / "shards"), "bpe"), tokenizer_dir, tmp_path / "out")


def test_the_prepare_cli_writes_the_data_directory_that_the_train_cli_takes(shard_server, tmp_path):
    write_fineweb_shards(shard_server.directory, [0, 1, 5], DOCS_PER_SHARD)
    preset = tmp_path / "run.json"
    preset.write_text(json.dumps(small_config(shard_server.url, depth=1, num_iterations=2, eval_every=2,
                                              sample_every=2, sample_max_tokens=4, save_every=2, compile=False,
                                              wandb_mode="disabled", device="cpu", dtype="float32").to_dict()))

    def cli(command: str, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([NANOCHAT, command, *arguments], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    bad = cli("prepare", "--config", str(preset), "--out-dir", str(tmp_path / "data"), "num_shards=4")
    assert (bad.returncode, bad.stderr) == (2, "error: RunConfig.num_shards: data_url has shards 0..1; num_shards=4 "
                                               "needs 0..3 (not found: 2..3)\n")
    assert not (tmp_path / "data").exists()

    prepared = cli("prepare", "--config", str(preset), "--out-dir", str(tmp_path / "data"))
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["train"]] == [0, 1] and [s["shard"] for s in manifest["val"]] == [5]
    assert (f"data: 2 train shards, {manifest['train_tokens']:,} train tokens, {manifest['val_tokens']:,} val tokens; "
            "tokenizer gpt2") in prepared.stdout

    trained = cli("train", "--config", str(preset), "--data-dir", str(tmp_path / "data"), "--out-dir",
                  str(tmp_path / "ckpt"), "num_iterations=3", "save_every=3")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((tmp_path / "ckpt" / "training_state.json").read_text())["steps_completed"] == 3
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_iterations"] == 3
    bad_override = cli("train", "--config", str(preset), "--data-dir", str(tmp_path / "data"), "--out-dir",
                       str(tmp_path / "x"), "depth=0")
    assert (bad_override.returncode, bad_override.stderr) == (2, "error: RunConfig.depth: must be >= 1, got 0\n")
    assert not (tmp_path / "x").exists()
    missing = cli("train", "--config", str(preset), "--data-dir", str(tmp_path / "nodata"), "--out-dir",
                  str(tmp_path / "x"))
    assert (missing.returncode, missing.stderr) == (2, f"error: train.data_dir: no such folder "
                                                       f"'{tmp_path / 'nodata'}' (a prepared data directory: nanochat "
                                                       "prepare)\n")


def test_the_clis_keep_a_data_directory_apart_from_its_source_and_from_a_checkpoint(tmp_path):
    """Output into the folder read from would mix the data with its shards, or a checkpoint's tokenizer folder with
    the data's: one line, before anything is written."""
    write_fineweb_shards(tmp_path / "corpus", [0, 1822], 5)
    before = sorted(path.name for path in (tmp_path / "corpus").iterdir())
    with pytest.raises(ConfigError, match=r"^prepare\.out_dir: .*corpus is data_url's folder"):
        prepare_main(["--config", str(CONFIGS / "smoke.yaml"), "--out-dir", str(tmp_path / "corpus"),
                      f"data_url={tmp_path / 'corpus'}"])
    assert sorted(path.name for path in (tmp_path / "corpus").iterdir()) == before
    with pytest.raises(ConfigError, match=r"^train\.out_dir: .*corpus is the data directory \(data_dir\)"):
        train_main(["--config", str(CONFIGS / "smoke.yaml"), "--data-dir", str(tmp_path / "corpus"),
                    "--out-dir", str(tmp_path / "corpus" / ".")])
    with pytest.raises(ConfigError, match=r"^train\.out_dir: .*shard_00000\.parquet is a file: the checkpoint goes in"):
        train_main(["--config", str(CONFIGS / "smoke.yaml"), "--data-dir", str(tmp_path / "corpus"),
                    "--out-dir", str(tmp_path / "corpus" / "shard_00000.parquet")])
    assert sorted(path.name for path in (tmp_path / "corpus").iterdir()) == before


@pytest.mark.parametrize("files", [("checkpoint.pt", "training_state.json"), ("training_state.json",)])
def test_prepare_refuses_an_out_dir_that_holds_a_checkpoint_before_anything_is_written(tmp_path, files):
    """(It wrote train/, val/ and manifest.json among the checkpoint's files and replaced its tokenizer folder.)"""
    write_fineweb_shards(tmp_path / "corpus", [0, 1822], 5)
    checkpoint = tmp_path / "base"
    (checkpoint / "tokenizer").mkdir(parents=True)
    (checkpoint / "tokenizer" / "tokenizer.json").write_text('{"name": "bpe"}')
    for name in files:
        (checkpoint / name).write_text("{}")
    before = {path: path.read_bytes() for path in checkpoint.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError) as error:
        prepare_main(["--config", str(CONFIGS / "smoke.yaml"), "--out-dir", str(checkpoint),
                      f"data_url={tmp_path / 'corpus'}"])
    assert str(error.value) == (f"prepare.out_dir: {checkpoint} holds a checkpoint ({', '.join(files)}): the data "
                                "directory (--out-dir) needs a folder of its own, or it would replace the "
                                "checkpoint's tokenizer")
    assert {path: path.read_bytes() for path in checkpoint.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in checkpoint.iterdir()) == sorted([*files, "tokenizer"])
