import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import make_data_dir, tiny_config

from nanochat_flyte.cli.sample import main
from nanochat_flyte.errors import UserError
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.training.pretrain import train

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


def test_the_compiled_decode_step_writes_the_same_sample(checkpoint, monkeypatch):
    engines = []  # the engine the CLI builds: the same sample alone would not tell --compile was heeded
    from_checkpoint = Engine.from_checkpoint

    def from_checkpoint_kept(*args, **kwargs):
        engines.append(from_checkpoint(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(Engine, "from_checkpoint", from_checkpoint_kept)
    completion = main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "6",
                       "--temperature", "0", "--device", "cpu", "--compile"])
    assert completion == last_training_sample(checkpoint, PROMPT)
    assert isinstance(engines[0].decode_model, torch._dynamo.eval_frame.OptimizedModule)


def test_the_cli_loads_a_checkpoint_from_a_file_uri(checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "nanochat_flyte", "sample", "--checkpoint", checkpoint.as_uri(), "--prompt", PROMPT,
         "--max-tokens", "6", "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == PROMPT + last_training_sample(checkpoint, PROMPT) + "\n"


def test_temperature_sampling_is_reproducible_from_the_seed(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "1.0",
            "--device", "cpu"]
    assert main(args + ["--seed", "1"]) == main(args + ["--seed", "1"]) != main(args + ["--seed", "2"])


@pytest.mark.parametrize("flags, problem", [
    (["--max-tokens", "0"], "--max-tokens: must be an integer >= 1, got 0"),
    (["--top-k", "-1"], "--top-k: must be an integer >= 0 (0: the whole vocabulary), got -1"),
    (["--seed", "99999999999999999999"], "argument --seed: must be an integer from 0 to 2**63 - 1, got "
                                         "'99999999999999999999'"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**63 - 1, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got 'nan'"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got 'inf'"),
    (["--temperature", "-0.5"], "argument --temperature: must be a finite number >= 0, got '-0.5'"),
], ids=["max-tokens-0", "top-k-negative", "seed-too-large", "seed-negative", "temperature-nan", "temperature-inf",
        "temperature-negative"])
def test_bad_arguments_are_refused_in_one_line_before_loading(tmp_path, capsys, flags, problem):
    with pytest.raises(SystemExit) as exit_:  # no checkpoint there: a refusal after loading would not get this far
        main(["--checkpoint", str(tmp_path), "--prompt", PROMPT, *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {problem} (see nanochat sample --help)\n"


def test_the_largest_seed_samples(checkpoint):
    main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "2", "--temperature", "1",
          "--seed", str(2**63 - 1), "--device", "cpu"])


def test_a_prompt_longer_than_the_context_is_refused_naming_the_flag(checkpoint):
    with pytest.raises(UserError, match=r"^--prompt: \d+ tokens leave no room in the model's context of 32 tokens$"):
        main(["--checkpoint", str(checkpoint), "--prompt", PROMPT * 10, "--device", "cpu"])


def test_a_sample_cut_short_by_the_context_says_so(checkpoint, capsys):
    """--max-tokens beyond the context: the text ends where the context does, and stderr says why."""
    long_prompt = PROMPT * 5  # 26 of the context's 32 tokens: the rest fill up before the tiny model writes its end
    main(["--checkpoint", str(checkpoint), "--prompt", long_prompt, "--max-tokens", "1000", "--device", "cpu"])
    assert capsys.readouterr().err == "(stopped at the end of the model's context of 32 tokens)\n"
    main(["--checkpoint", str(checkpoint), "--prompt", long_prompt, "--max-tokens", "3", "--device", "cpu"])
    assert capsys.readouterr().err == ""  # as many tokens as asked for


def test_the_default_is_greedy_like_the_samples_taken_in_training(checkpoint):
    completion = main(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "6", "--device", "cpu"])
    assert completion == last_training_sample(checkpoint, PROMPT)


def test_a_checkpoint_samples_without_the_network(checkpoint, tmp_path):
    """The checkpoint carries its tokenizer's ranks: an empty tiktoken cache (nothing to read, and downloads fail
    here) changes nothing."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sample", "--checkpoint", str(checkpoint),
                             "--prompt", PROMPT, "--max-tokens", "6"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == PROMPT + last_training_sample(checkpoint, PROMPT) + "\n"
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").iterdir())


def test_user_errors_of_the_sample_and_train_clis_are_one_line(tmp_path):
    sample = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sample", "--checkpoint", str(tmp_path / "none"),
                             "--prompt", PROMPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (sample.returncode, sample.stderr) == (2, f"error: argument --checkpoint: no checkpoint.pt in "
                                                     f"{tmp_path / 'none'}: not a checkpoint directory (see nanochat "
                                                     "sample --help)\n")
    (tmp_path / "typo.yaml").write_text("depht: 2\n")
    train = subprocess.run([sys.executable, "-m", "nanochat_flyte", "train", "--config", str(tmp_path / "typo.yaml"),
                            "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert (train.returncode, train.stderr) == (2, "error: RunConfig.depht: unknown field; did you mean depth?\n")
    resume = subprocess.run([sys.executable, "-m", "nanochat_flyte", "train", "--data-dir", str(tmp_path),
                             "--out-dir", str(tmp_path / "out"), "--resume-dir", str(tmp_path / "none")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert (resume.returncode, resume.stderr) == (2, f"error: train.resume_dir: {tmp_path / 'none'} is not a "
                                                     "checkpoint directory (no training_state.json and config.json)\n")
