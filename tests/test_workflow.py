"""The whole `main` workflow, run in-process by flytekit against shards served from 127.0.0.1."""

import json
import math
from pathlib import Path

import pytest

from nanochat_flyte.config import RunConfig
from tests.shard_server import serve_shards, write_fineweb_shards
from workflows.nanochat import main

VAL_SHARD = 1822


def tiny_config(data_url: str, **changes) -> RunConfig:
    """Small enough for a 2-core CI machine, big enough that the loss visibly falls."""
    values = dict(run_name="e2e", data_url=data_url, num_shards=2, val_shard=VAL_SHARD, depth=1, max_seq_len=64,
                  device_batch_size=4, total_batch_size=512, num_iterations=12, eval_every=6, eval_tokens=2048,
                  sample_every=6, sample_max_tokens=4, save_every=6, compile=False, wandb_mode="offline",
                  download_workers=2)
    values.update(changes)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def served_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_fineweb_shards(directory, [0, 1, VAL_SHARD], docs_per_shard=150)
    with serve_shards(directory) as server:
        yield server


@pytest.fixture(autouse=True)
def private_shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "shard-cache"))


def test_main_runs_end_to_end(served_shards):
    results, checkpoint = main(config=tiny_config(served_shards.url))

    assert results["workflow"] == "nanochat_full_training"
    assert results["run_name"] == "e2e"
    training = results["training"]
    assert training["status"] == "completed"
    assert (training["depth"], training["num_iterations"]) == (1, 12)
    assert math.isfinite(training["min_validation_bpb"]) and math.isfinite(training["final_validation_bpb"])
    assert training["min_validation_bpb"] <= training["final_validation_bpb"]
    assert results["data"]["train_shards"] == [0, 1] and results["data"]["val_shards"] == [VAL_SHARD]
    assert results["environment"]["torch"]
    json.dumps(results)  # the results are one JSON document

    checkpoint_dir = Path(checkpoint.path)
    assert training["checkpoint_dir"]
    for name in ("checkpoint.pt", "model_config.json", "training_state.json", "tokenizer/tokenizer.json",
                 "metrics.jsonl", "samples.jsonl", "report.md"):
        assert (checkpoint_dir / name).exists(), name
    losses = [row["train/loss"] for row in map(json.loads, (checkpoint_dir / "metrics.jsonl").open())
              if "train/loss" in row]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    prompts = {json.loads(line)["prompt"] for line in (checkpoint_dir / "samples.jsonl").open()}
    assert {"The capital of France is", "If yesterday was Friday, then tomorrow will be"} <= prompts


@pytest.mark.parametrize("changes, field", [
    (dict(depth=0), "depth"),
    (dict(total_batch_size=500), "total_batch_size"),
    (dict(num_shards=0), "num_shards"),
    (dict(tokenizer="wordpiece"), "tokenizer"),
])
def test_bad_config_fails_before_any_download(served_shards, changes, field):
    served_shards.requests.clear()
    with pytest.raises(Exception, match=rf"RunConfig\.{field}: "):
        main(config=tiny_config(served_shards.url, **changes))
    assert served_shards.requests == []


def test_unreachable_data_url_fails_in_setup(served_shards):
    with pytest.raises(Exception, match=r"RunConfig\.data_url: .*unreachable"):
        main(config=tiny_config("http://127.0.0.1:9/no-such-mirror"))
