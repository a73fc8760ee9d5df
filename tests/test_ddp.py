import json
import subprocess
import sys

import pytest
from helpers import make_data_dir, tiny_config

from nanochat_flyte.cli.usage import launcher_words
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


FAILS_ON_RANK_1 = """
import sys
from nanochat_flyte.cli import main
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.training.loop import Trainer

optimizer_step = Trainer.optimizer_step


def fails_on_rank_1(self, step):
    if step == 2 and self.rank == 1:  # as a CUDA out-of-memory at the smallest batch stops one rank
        raise ConfigError("device_batch_size", "out of memory on rank 1")
    return optimizer_step(self, step)


Trainer.optimizer_step = fails_on_rank_1
main(sys.argv[1:])
"""


def test_a_rank_that_fails_leaves_its_line_unburied(tmp_path):
    """Rank 1 stops with a user error; rank 0, in the gradient all-reduce, loses its peer: one line of its own, not
    a traceback over rank 1's line."""
    data_dir = make_data_dir(tmp_path / "data", n_train_tokens=20_000, n_val_tokens=2_000)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(num_iterations=5, eval_every=5).to_dict()))
    (tmp_path / "fails_on_rank_1.py").write_text(FAILS_ON_RANK_1)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "fails_on_rank_1.py"), "train", "--config", str(tmp_path / "config.json"),
         "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "ddp")],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "error: RunConfig.device_batch_size: out of memory on rank 1\n" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_resume_command_printed_under_torchrun_launches_as_many_processes(monkeypatch):
    assert launcher_words("train") == ["nanochat", "train"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launcher_words("sft") == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "nanochat_flyte", "sft"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert launcher_words("rl")[:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=8"]
