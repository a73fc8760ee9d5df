import json
import os
import subprocess
import sys

import pytest
from helpers import make_data_dir, tiny_config

from nanochat_flyte.sample import main
from nanochat_flyte.train import train

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data_dir = make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=5_000, n_val_tokens=1_000)
    out = tmp_path_factory.mktemp("checkpoint")
    train(tiny_config(num_iterations=4, sample_max_tokens=6), data_dir, out)
    return out


def last_training_sample(checkpoint, prompt):
    samples = [json.loads(line) for line in (checkpoint / "samples.jsonl").read_text().splitlines()]
    return [s["completion"] for s in samples if s["prompt"] == prompt][-1]


def test_greedy_sampling_repeats_the_sample_taken_in_training(checkpoint, capsys):
    completion = main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "6",
                       "--temperature", "0", "--device", "cpu"])
    assert completion == last_training_sample(checkpoint, PROMPT)
    assert capsys.readouterr().out == PROMPT + completion + "\n"


def test_the_cli_loads_a_checkpoint_from_a_file_uri(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "nanochat_flyte.sample", "--checkpoint", checkpoint.as_uri(), "--prompt", PROMPT,
         "--max-tokens", "6", "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == PROMPT + last_training_sample(checkpoint, PROMPT) + "\n"


def test_temperature_sampling_is_reproducible_from_the_seed(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "1.0",
            "--device", "cpu"]
    assert main(args + ["--seed", "1"]) == main(args + ["--seed", "1"])


def test_bad_arguments_are_refused(checkpoint):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "0"])


def test_the_default_is_greedy_like_the_samples_taken_in_training(checkpoint):
    completion = main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "6", "--device", "cpu"])
    assert completion == last_training_sample(checkpoint, PROMPT)


def test_a_checkpoint_samples_without_the_network(checkpoint, tmp_path):
    """The checkpoint carries its tokenizer's ranks: an empty tiktoken cache (nothing to read, and downloads fail
    here) changes nothing."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte.sample", "--checkpoint", str(checkpoint),
                             "--prompt", PROMPT, "--max-tokens", "6"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == PROMPT + last_training_sample(checkpoint, PROMPT) + "\n"
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").iterdir())


def test_user_errors_of_the_sample_and_train_clis_are_one_line(tmp_path):
    sample = subprocess.run([sys.executable, "-m", "nanochat_flyte.sample", "--checkpoint", str(tmp_path / "none"),
                             "--prompt", PROMPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (sample.returncode, sample.stderr) == (2, f"error: no checkpoint.pt in {tmp_path / 'none'}: not a "
                                                     "checkpoint directory\n")
    (tmp_path / "typo.yaml").write_text("depht: 2\n")
    train = subprocess.run([sys.executable, "-m", "nanochat_flyte.train", "--config", str(tmp_path / "typo.yaml"),
                            "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert (train.returncode, train.stderr) == (2, "error: RunConfig.depht: unknown field; did you mean depth?\n")
