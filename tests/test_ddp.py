import json
import subprocess
import sys

import pytest
from helpers import make_data_dir, tiny_config

from nanochat_flyte.training.pretrain import train

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def train_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_two_cpu_ranks_see_the_single_process_losses(tmp_path):
    """2 gloo ranks x 1 micro-batch of 4 rows vs 1 process x 2 accumulation steps: the same tokens, the same
    effective batch, so the same losses up to float summation order."""
    data_dir = make_data_dir(tmp_path / "data", n_train_tokens=20_000, n_val_tokens=2_000)
    config = tiny_config(num_iterations=5, eval_every=5, sample_every=5, save_every=5)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    single = train(config, data_dir, tmp_path / "single")
    assert single["grad_accum_steps"] == 2

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "nanochat_flyte", "train", "--config", str(tmp_path / "config.json"), "--data-dir", str(data_dir),
         "--out-dir", str(tmp_path / "ddp")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_losses = train_losses(tmp_path / "ddp")
    assert [step for step, _ in ddp_losses] == [1, 2, 3, 4, 5]  # rank 0 alone logs
    assert [loss for _, loss in ddp_losses] == pytest.approx([loss for _, loss in train_losses(tmp_path / "single")],
                                                             rel=1e-4)
    summary = json.loads((tmp_path / "ddp" / "training_state.json").read_text())
    assert summary["grad_accum_steps"] == 1 and summary["status"] == "completed"
    assert result.stdout.count("step 00005/00005") == 1
