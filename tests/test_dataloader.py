import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_data_dir

from nanochat_flyte.cli.train import main as train_main
from nanochat_flyte.data.dataloader import TokenLoader, data_manifest, shard_files, validation_tokens
from nanochat_flyte.errors import ConfigError

CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=3_000, n_val_tokens=500)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_shards(data_dir):
    loader = TokenLoader(shard_files(data_dir, "train"), batch_size=4, seq_len=16, seed=0, device=CPU)
    stream = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in shard_files(data_dir, "train")])
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    text = stream.tobytes()
    for row in torch.cat([inputs, targets[:, -1:]], dim=1):  # every row is a contiguous piece of a shard
        assert row.numpy().astype(np.uint16).tobytes() in text


def test_order_is_deterministic_from_the_seed(data_dir):
    files = shard_files(data_dir, "train")
    first = take(TokenLoader(files, 4, 16, seed=1, device=CPU), 3)
    again = take(TokenLoader(files, 4, 16, seed=1, device=CPU), 3)
    other = take(TokenLoader(files, 4, 16, seed=2, device=CPU), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("prefetch", [False, True])
def test_resumed_loader_continues_the_same_stream(data_dir, prefetch):
    files = shard_files(data_dir, "train")
    straight = take(TokenLoader(files, 4, 16, seed=0, device=CPU, prefetch=prefetch), 6)
    first = TokenLoader(files, 4, 16, seed=0, device=CPU, prefetch=prefetch)
    take(first, 2)
    state = first.state_dict()
    first.close()
    resumed = TokenLoader(files, 4, 16, seed=0, device=CPU, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[2:], take(resumed, 4)))
    resumed.close()


def test_ranks_split_the_single_process_batch(data_dir):
    files = shard_files(data_dir, "train")
    single = take(TokenLoader(files, 2, 16, seed=0, device=CPU), 4)  # 2 accumulation steps of 2 windows, twice
    ranks = [take(TokenLoader(files, 2, 16, seed=0, device=CPU, rank=r, world_size=2), 2) for r in range(2)]
    assert torch.equal(ranks[0][0][0], single[0][0]) and torch.equal(ranks[1][0][0], single[1][0])
    assert torch.equal(ranks[0][1][0], single[2][0]) and torch.equal(ranks[1][1][0], single[3][0])


def test_wraps_into_a_new_epoch_when_the_data_runs_out(data_dir, capsys):
    loader = TokenLoader(shard_files(data_dir, "train"), 8, 16, seed=0, device=CPU)
    take(loader, loader.num_windows // 8 + 2)
    assert loader.epoch > 1.0
    assert capsys.readouterr().out.count("starting epoch") == 1  # once, at the start of epoch 2
    # a run resumed in its second epoch says nothing until its third starts
    resumed = TokenLoader(shard_files(data_dir, "train"), 8, 16, seed=0, device=CPU)
    resumed.load_state_dict(loader.state_dict())
    take(resumed, 1)
    assert "starting epoch" not in capsys.readouterr().out
    take(resumed, loader.num_windows // 8)
    assert capsys.readouterr().out == "data: train tokens exhausted, starting epoch 3\n"


def test_refuses_a_state_from_a_different_stream(data_dir):
    files = shard_files(data_dir, "train")
    state = TokenLoader(files, 4, 16, seed=0, device=CPU).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(files, 4, 32, seed=0, device=CPU).load_state_dict(state)


def test_validation_tokens_are_the_first_tokens_of_the_val_split(data_dir):
    val = validation_tokens(data_dir, 100)
    assert len(val) == 100
    assert np.array_equal(val, np.fromfile(shard_files(data_dir, "val")[0], dtype=np.uint16)[:100])


def test_data_too_small_for_one_micro_batch_names_the_context(data_dir):
    with pytest.raises(ConfigError, match=r"^RunConfig\.max_seq_len: the train data holds \d+ windows of 1000001"):
        TokenLoader(shard_files(data_dir, "train"), 4, 1_000_000, seed=0, device=CPU)


@pytest.mark.parametrize("manifest, problem", [
    ('{"tokenizer": {"name": "gpt2"', r"manifest\.json is not a JSON document \(Expecting"),  # cut short
    (json.dumps({"endpoint": "http://hub", "seed": 42, "val": {}, "train_conversations": 9, "val_conversations": 2}),
     r"holds no pretraining data: its manifest\.json has no tokenizer, train, train_tokens, val_tokens \(a chat "
     r"stage's data\? `nanochat prepare` writes pretraining's\)$"),  # an SFT data directory's
    ("[1, 2]", "holds no pretraining data: its manifest.json has no tokenizer, train, val, train_tokens"),
])
def test_a_manifest_that_is_not_pretraining_s_is_one_line_on_data_dir(tmp_path, manifest, problem):
    (tmp_path / "manifest.json").write_text(manifest)  # (a KeyError or a JSONDecodeError traceback, before)
    with pytest.raises(ConfigError, match=rf"^train\.data_dir: {re.escape(str(tmp_path))}.*{problem}") as error:
        data_manifest(tmp_path)
    assert "\n" not in str(error.value)


def test_training_on_a_chat_stage_s_data_directory_is_one_line_before_anything_is_written(tmp_path):
    sft_data = tmp_path / "sft_data"
    sft_data.mkdir()
    (sft_data / "manifest.json").write_text(json.dumps({"endpoint": "http://hub", "sources": [], "val": {},
                                                        "train_conversations": 9, "val_conversations": 2}))
    with pytest.raises(ConfigError, match=r"^train\.data_dir: .*sft_data holds no pretraining data"):
        train_main(["--config", str(CONFIGS / "smoke.yaml"), "--data-dir", str(sft_data),
                    "--out-dir", str(tmp_path / "run"), "device=cpu"])
    assert not (tmp_path / "run").exists()
