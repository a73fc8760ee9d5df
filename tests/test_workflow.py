"""The whole `main` workflow, run in-process by flytekit against shards and a CORE bundle served from 127.0.0.1."""

import json
import math
from pathlib import Path

import pytest

from nanochat_flyte.config import RunConfig
from tests.core_bundle import write_core_bundle, zip_directory
from tests.shard_server import serve_shards, write_fineweb_shards
from workflows.nanochat import main
from workflows.scale_up import nanochat_d12_8xa100

VAL_SHARD = 1822


def tiny_config(data_url: str, **changes) -> RunConfig:
    """Small enough for a 2-core CI machine, big enough that the loss visibly falls. CORE off unless asked."""
    values = dict(run_name="e2e", data_url=data_url, num_shards=2, val_shard=VAL_SHARD, depth=1, max_seq_len=64,
                  device_batch_size=4, total_batch_size=512, num_iterations=12, eval_every=6, eval_tokens=2048,
                  sample_every=6, sample_max_tokens=4, save_every=6, compile=False, wandb_mode="offline",
                  download_workers=2, eval_bundle_url="")
    values.update(changes)
    return RunConfig(**values)


def interruptible_run(path: Path, data_url: str) -> Path:
    """A run config file for the Ctrl-C tests: 8 steps of ~1 s on 2 cores, saved every 2, so that an interrupt after
    the first save lands long before the run could finish."""
    config = tiny_config(data_url, depth=2, device_batch_size=8, total_batch_size=2048, num_iterations=8,
                         eval_every=8, sample_every=8, save_every=2, wandb_mode="disabled")
    path.write_text(json.dumps(config.to_dict()))
    return path


@pytest.fixture(scope="module")
def served_shards(tmp_path_factory):
    """The shards, and the CORE bundle as /eval_bundle.zip in the official layout."""
    directory = tmp_path_factory.mktemp("shards")
    write_fineweb_shards(directory, [0, 1, VAL_SHARD], docs_per_shard=150)
    bundle = write_core_bundle(tmp_path_factory.mktemp("bundle"), examples_per_task=8)
    zip_directory(bundle, directory / "eval_bundle.zip")
    with serve_shards(directory) as server:
        yield server


@pytest.fixture(autouse=True)
def private_shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_FLYTE_CACHE", str(tmp_path / "shard-cache"))


def e2e_config(served_shards) -> RunConfig:
    """The end-to-end run: CORE scored during training (step 6) and on the final checkpoint."""
    return tiny_config(served_shards.url, eval_bundle_url=served_shards.url + "/eval_bundle.zip", core_max_per_task=4,
                       core_metric_every=6)


def check_e2e_outputs(results: dict, checkpoint_dir: Path, report_dir: Path) -> None:
    """What `main` returns for e2e_config, under either Flyte front: the results JSON, the checkpoint and report."""
    assert results["workflow"] == "nanochat_full_training"
    assert results["run_name"] == "e2e"
    training = results["training"]
    assert training["status"] == "completed"
    assert (training["depth"], training["num_iterations"]) == (1, 12)
    assert math.isfinite(training["min_validation_bpb"]) and math.isfinite(training["final_validation_bpb"])
    assert training["min_validation_bpb"] <= training["final_validation_bpb"]
    assert results["data"]["train_shards"] == [0, 1] and results["data"]["val_shards"] == [VAL_SHARD]
    # the run's share of the data, from its own length (the cached data directory serves runs of any length)
    data = results["data"]
    assert data["tokens_needed"] == results["config"]["num_iterations"] * results["config"]["total_batch_size"]
    assert data["epochs"] == pytest.approx(data["tokens_needed"] / data["train_tokens"], rel=1e-3)
    assert results["environment"]["torch"]
    json.dumps(results)  # the results are one JSON document

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

    # CORE: during training at step 6 (core_metric_every), then evaluate_base_model on the final checkpoint
    core = results["core"]
    assert set(core["tasks"]) == {"mc_fewshot", "mc_zeroshot", "schema_fewshot", "lm_zeroshot", "qa_answer"}
    assert all(task["examples"] == 4 for task in core["tasks"].values()) and math.isfinite(core["core_metric"])
    in_training = [row for row in map(json.loads, (checkpoint_dir / "metrics.jsonl").open()) if "core_metric" in row]
    assert [row["step"] for row in in_training] == [6]
    card = (report_dir / "report.md").read_text()
    assert "| mc_fewshot | multiple_choice |" in card and "## Samples at step 12" in card
    assert json.loads((report_dir / "results.json").read_text()) == json.loads(json.dumps(results))


def test_main_runs_end_to_end(served_shards):
    results, checkpoint, report = main(config=e2e_config(served_shards))
    check_e2e_outputs(results, Path(checkpoint.path), Path(report.path))


def test_core_is_off_without_a_bundle_and_an_unreachable_bundle_fails_before_training(served_shards):
    results, _, report = main(config=tiny_config(served_shards.url, num_iterations=2, eval_every=2, sample_every=2,
                                                 save_every=2))
    assert results["core"] is None and "mc_fewshot" not in (Path(report.path) / "report.md").read_text()
    served_shards.requests.clear()
    with pytest.raises(Exception, match=r"RunConfig\.eval_bundle_url: .*not found"):
        main(config=tiny_config(served_shards.url, eval_bundle_url=served_shards.url + "/no_bundle.zip"))
    assert {r.method for r in served_shards.requests} == {"HEAD"}  # probes only: no shard was downloaded


@pytest.mark.parametrize("changes, field", [
    (dict(depth=0), "depth"),
    (dict(total_batch_size=500), "total_batch_size"),
    (dict(num_shards=0), "num_shards"),
    (dict(tokenizer="wordpiece"), "tokenizer"),
    (dict(save_to="/dev/null/run"), "save_to"),  # a file where its folder would go: the first copy would fail
])
def test_bad_config_fails_before_any_download(served_shards, changes, field):
    served_shards.requests.clear()
    with pytest.raises(Exception, match=rf"RunConfig\.{field}: "):
        main(config=tiny_config(served_shards.url, **changes))
    assert served_shards.requests == []


def test_the_eight_gpu_run_checks_its_batch_for_eight_gpus_before_any_download(served_shards):
    """512 tokens a step are 2 micro-batches of 4 x 64 on one GPU, and less than one over eight."""
    served_shards.requests.clear()
    with pytest.raises(Exception, match=r"RunConfig\.total_batch_size: 512 is not divisible by .* x 8 = 2048"):
        nanochat_d12_8xa100(config=tiny_config(served_shards.url))
    assert served_shards.requests == []


def test_unreachable_data_url_fails_in_setup(served_shards):
    with pytest.raises(Exception, match=r"RunConfig\.data_url: .*unreachable"):
        main(config=tiny_config("http://127.0.0.1:9/no-such-mirror"))


def test_every_input_of_an_entry_workflow_has_a_description_for_the_console():
    """The console's launch and relaunch forms show each input's description, from the docstring's Args."""
    from workflows.chat import chat_rl, chat_sft, nanochat_chat, nanochat_chat_rl
    from workflows.scale_up import nanochat_d12_a100

    for entry in (main, chat_sft, chat_rl, nanochat_chat, nanochat_chat_rl, nanochat_d12_a100, nanochat_d12_8xa100):
        undescribed = [name for name, variable in entry.interface.inputs.items() if variable.description == name]
        assert undescribed == [], entry.name
