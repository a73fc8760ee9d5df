"""SFT end to end: a tiny base checkpoint fine-tuned on the chat mixture served by the local hub."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import interrupted_after_a_save, make_data_dir, tiny_config

from nanochat_flyte.cli import chat_stage
from nanochat_flyte.cli.chat_stage import (
    FETCHED_FILE,
    data_cache_dir,
    fetched_once_per_node,
)
from nanochat_flyte.config import ChatConfig, RunConfig
from nanochat_flyte.data.chat_data import prepare_sft_data
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.model.checkpoint import checkpoint_run_config, load_checkpoint
from nanochat_flyte.model.optim import build_optimizers
from nanochat_flyte.training.loop import build_model
from nanochat_flyte.training.pretrain import train
from nanochat_flyte.training.resume import check_chat_resume
from nanochat_flyte.training.sft import CHAT_SAMPLE_PROMPTS, FineTuning, sft_run_config, train_chat

ROOT = Path(__file__).resolve().parents[1]


def chat_config(**changes) -> ChatConfig:
    """A few SFT steps on rows of 128 tokens (the base model was trained on 32: rotary positions extend)."""
    values = dict(max_seq_len=128, device_batch_size=4, total_batch_size=1024, num_iterations=16, eval_every=8,
                  sample_every=16, sample_max_tokens=8, save_every=8, max_conversations=200, val_conversations=20,
                  device="cpu", dtype="float32", compile=False, wandb_mode="disabled")
    values.update(changes)
    return ChatConfig(**values)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train(tiny_config(num_iterations=20, eval_every=20, sample_every=20, save_every=20, warmdown_ratio=0.2),
          make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=30_000), out)
    return out


def val_losses(checkpoint_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val/loss"] for row in rows if "val/loss" in row]


def test_sft_lowers_the_loss_on_held_out_assistant_tokens(base_checkpoint, hub_server, tmp_path):
    config = chat_config()
    manifest = prepare_sft_data(config, tmp_path / "sft_data")
    assert manifest["train_conversations"] == 200
    summary = train_chat(config, base_checkpoint, tmp_path / "sft_data", tmp_path / "chat")

    assert summary["phase"] == "chat" and summary["status"] == "completed" and summary["steps_completed"] == 16
    losses = val_losses(tmp_path / "chat")
    assert len(losses) == 3  # steps 0 (the base model), 8 and 16
    assert losses[-1] < losses[0] - 0.5, losses  # fine-tuning learns the held-out answers' format and words
    assert summary["final_validation_loss"] == losses[-1]
    state = json.loads((tmp_path / "chat" / "training_state.json").read_text())
    assert state["phase"] == "chat"
    engine = Engine.from_checkpoint(tmp_path / "chat", device="cpu")
    assert engine.phase == "chat" and engine.chat_mode
    samples = [json.loads(line) for line in (tmp_path / "chat" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} >= {"What is the capital of France?"}


def test_a_sample_prompt_longer_than_the_context_is_skipped_and_the_run_saves(base_checkpoint, hub_server, tmp_path):
    """A context of 16 tokens: "If 5*x + 3 = 13, what is x?" renders to 17, leaving no room to answer. Sampling it
    crashed the last step, before the final save."""
    config = chat_config(max_seq_len=16, total_batch_size=128, num_iterations=2, eval_every=2, sample_every=2,
                         save_every=2)
    prepare_sft_data(config, tmp_path / "sft_data")
    summary = train_chat(config, base_checkpoint, tmp_path / "sft_data", tmp_path / "chat")
    assert summary["status"] == "completed" and (tmp_path / "chat" / "checkpoint.pt").exists()
    samples = [json.loads(line) for line in (tmp_path / "chat" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} == set(CHAT_SAMPLE_PROMPTS) - {"If 5*x + 3 = 13, what is x?"}

@pytest.mark.parametrize("load_optimizer", [True, False])
def test_sft_starts_from_the_base_runs_optimizer_moments_at_its_own_rates(base_checkpoint, hub_server, tmp_path,
                                                                         load_optimizer):
    """As nanochat's SFT: Adam's moments and Muon's momentum carried over from pretraining, under SFT's own learning
    rates (the base run's x init_lr_frac); with load_optimizer false, fresh states."""
    config = chat_config(load_optimizer=load_optimizer)
    prepare_sft_data(config, tmp_path / "sft_data")
    run_config = sft_run_config(config, checkpoint_run_config(base_checkpoint))
    phase = FineTuning(run_config, config, base_checkpoint, tmp_path / "sft_data")
    model = build_model(run_config, phase.tokenizer.n_vocab, torch.device("cpu"))
    optimizers = build_optimizers(model, run_config)
    rates = [[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers]
    phase.load_start(model, optimizers)
    base = load_checkpoint(base_checkpoint)["optimizers"]
    for optimizer, saved in zip(optimizers, base, strict=True):
        moments = [state for state in optimizer.state_dict()["state"].values()]
        assert bool(moments) == load_optimizer
        if load_optimizer:
            assert all(torch.equal(mine[key], theirs[key]) for mine, theirs in zip(moments, saved["state"].values())
                       for key in mine if torch.is_tensor(mine[key]) and mine[key].dim())
    assert [[group["lr"] for group in optimizer.param_groups] for optimizer in optimizers] == rates  # SFT's own


def test_sft_inherits_the_base_runs_batch_and_scaled_learning_rates():
    base = RunConfig(run_name="base_run", residual_scalars=True, scalar_lr=0.2)
    config = sft_run_config(ChatConfig(init_lr_frac=0.5), base)
    assert (config.max_seq_len, config.device_batch_size, config.total_batch_size) == (512, 16, 65536)
    assert (config.matrix_lr, config.embedding_lr, config.scalar_lr) == (0.01, 0.1, 0.1)
    assert config.residual_scalars  # the base model's shape
    assert config.run_name == "base_run_sft" and config.warmdown_ratio == 0.5
    with pytest.raises(ConfigError, match=r"^ChatConfig\.total_batch_size: "):
        sft_run_config(ChatConfig(total_batch_size=1000), base)
    # a base run's CUDA graphs go with its compile: a stage without one runs eager, a valid config
    graphs = RunConfig(compile_mode="reduce-overhead")
    assert sft_run_config(ChatConfig(compile=False), graphs).validate().compile_mode == "default"
    assert sft_run_config(ChatConfig(), graphs).validate().compile_mode == "reduce-overhead"


def test_the_sft_cli_trains_from_the_hub_and_refuses_a_bad_field_or_batch_before_any_data(base_checkpoint,
                                                                                        hub_server, tmp_path):
    preset = tmp_path / "chat.json"
    preset.write_text(json.dumps(chat_config(num_iterations=4, eval_every=4, sample_every=4, save_every=4).to_dict()))
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint",
                             base_checkpoint.as_uri(), "--out-dir", str(tmp_path / "chat"), "--config", str(preset),
                             "seed=7"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert summary["phase"] == "chat" and summary["steps_completed"] == 4

    bad = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(base_checkpoint),
                          "--out-dir", str(tmp_path / "x"), "mmlu_epoch=2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: ChatConfig.mmlu_epoch: unknown field; did you mean mmlu_epochs?"

    # a batch that does not split into the base run's rows: named before the data is prepared (seed 8: new data)
    split = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(base_checkpoint),
                            "--out-dir", str(tmp_path / "y"), "seed=8", "total_batch_size=1000"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert split.returncode == 2 and split.stderr.startswith("error: ChatConfig.total_batch_size: 1000 is not")
    assert split.stdout == ""  # no data prepared
    missing = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(tmp_path / "no"),
                              "--out-dir", str(tmp_path / "z")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr == (f"error: chat_sft.base_checkpoint: {tmp_path / 'no'} is not a checkpoint directory (no "
                              "training_state.json)\n")
    (tmp_path / "here").mkdir()  # the same from `--out-dir .`: its start checkpoint goes beside the folder
    here = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(base_checkpoint),
                           "--out-dir", ".", "seed=8", "total_batch_size=1000"], cwd=tmp_path / "here",
                          capture_output=True, text=True, timeout=120)
    assert here.returncode == 2 and here.stderr.startswith("error: ChatConfig.total_batch_size: 1000 is not")
    # the chat checkpoint just trained, as a base: SFT starts from a pretrained model (nothing prepared, nothing copied)
    chat = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(tmp_path / "chat"),
                           "--out-dir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 2 and chat.stderr == (
        f"error: chat_sft.base_checkpoint: {tmp_path / 'chat'} is a chat checkpoint; SFT starts from a base "
        "(pretrained) checkpoint: give the one it was fine-tuned from\n")
    onto = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(base_checkpoint),
                           "--out-dir", str(tmp_path / "v"), f"save_to={base_checkpoint}/"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert onto.returncode == 2 and onto.stderr.startswith(
        f"error: ChatConfig.save_to: '{base_checkpoint}/' holds the base_checkpoint: this run's copies would")
    # data prepared with other settings than the config's: the run would train on it and record the config's
    prepare_sft_data(chat_config(), tmp_path / "prepared")
    other = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint", str(base_checkpoint),
                            "--out-dir", str(tmp_path / "u"), "--data-dir", str(tmp_path / "prepared"), "--config",
                            str(preset), "smoltalk_epochs=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and other.stderr == (
        f"error: ChatConfig.smoltalk_epochs: 2.0 differs from the 1.0 that the data in {tmp_path / 'prepared'} was "
        "prepared with: give that value, or leave out --data-dir to prepare the data this config asks for\n")


def test_ctrl_c_prints_the_command_that_resumes_the_sft_run_and_that_command_does(base_checkpoint, hub_server,
                                                                                   tmp_path):
    preset = tmp_path / "chat preset.json"  # a space: the printed command quotes it
    preset.write_text(json.dumps(chat_config(num_iterations=4, eval_every=4, sample_every=4, save_every=1).to_dict()))
    out = tmp_path / "chat"
    command = ["sft", "--base-checkpoint", str(base_checkpoint), "--out-dir", str(out), "--config", str(preset),
               "seed=7"]
    _, lines = interrupted_after_a_save([sys.executable, "-m", "nanochat_flyte", *command], ROOT, dict(os.environ),
                                        "step 00001 | saved checkpoint to ")
    resume = next(line for line in lines if line.startswith("resume with: ")).removeprefix("resume with: ")
    words = shlex.split(resume)
    assert words == ["nanochat", *command[:-1], "--resume-dir", str(out), "seed=7"], "".join(lines)[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "nanochat_flyte", *words[1:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # went on from its last save to the end, no step twice


def test_a_remote_start_checkpoint_is_fetched_by_one_rank_per_node_and_the_others_wait(tmp_path):
    memory = fsspec.filesystem("memory")
    memory.pipe({"/ckpt/checkpoint.pt": b"weights", "/ckpt/tokenizer/ranks.txt": b"ranks"})
    local_dir = tmp_path / "chat_start"
    local_dir.mkdir()
    (local_dir / "notes.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match=r"chat_sft\.out_dir: .*chat_start, where the start checkpoint is downloaded "
                                          "to, holds files this command did not put there"):
        fetched_once_per_node("memory://ckpt", local_dir, "chat_sft")
    assert (local_dir / "notes.txt").read_text() == "a user's file"  # never deleted
    (local_dir / "notes.txt").unlink()
    (local_dir / "stale.pt").write_text("another source's file")  # fetched here before, from elsewhere
    (local_dir / FETCHED_FILE).write_text(json.dumps({"source": "memory://older", "complete": True}))
    # local rank 1 of the node, in its own process: its memory:// is empty, so it can only wait for rank 0's download.
    # It looks every 10 ms, says when it has looked once, and counts its looks.
    rank_one = textwrap.dedent("""\
        import pathlib, sys, time
        import nanochat_flyte.cli.chat_stage as stage
        looks, sleep = [], time.sleep
        def look_again(seconds):
            looks.append(seconds)
            if len(looks) == 1:
                print("waiting", flush=True)
            sleep(seconds)
        stage.DATA_POLL_S, time.sleep = 0.01, look_again
        print(stage.fetched_once_per_node("memory://ckpt", pathlib.Path(sys.argv[1]), "chat_sft"), len(looks))
        """)
    waiter = subprocess.Popen([sys.executable, "-c", rank_one, str(local_dir)],
                              env={**os.environ, "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # it has looked (the stale marker names another source) while rank 0 has not begun
    assert waiter.stdout.readline() == "waiting\n"
    assert fetched_once_per_node("memory://ckpt", local_dir, "chat_sft") == local_dir  # this is local rank 0
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err[-2000:]
    where, looks = out.split()
    assert where == str(local_dir) and int(looks) >= 1  # it waited, and then took rank 0's download
    assert sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()) == [
        "checkpoint.pt", FETCHED_FILE, "tokenizer/ranks.txt"]  # the stale file of another source is gone

    memory.rm("/ckpt", recursive=True)  # the same URI again: its complete download is reused, not fetched again
    assert fetched_once_per_node("memory://ckpt", local_dir, "chat_sft") == local_dir
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        fetched_once_per_node("memory://other", local_dir, "chat_sft")  # another URI is fetched (here: missing)


def test_an_object_store_without_credentials_is_one_line(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HF_ENDPOINT="http://127.0.0.1:9")  # no credentials from anywhere
    result = subprocess.run([sys.executable, "-m", "nanochat_flyte", "sft", "--base-checkpoint",
                             "s3://no-such-bucket/checkpoint", "--out-dir", str(tmp_path / "chat")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: chat_sft.base_checkpoint: cannot read 's3://no-such-bucket/checkpoint': "
                                    "Unable to locate credentials for an object store URI (s3://, gs://)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_clis_data_cache_is_keyed_by_the_data_format_too(monkeypatch):
    keys = ("seed", "max_conversations")
    first = data_cache_dir("sft_data", ChatConfig(), keys)
    assert data_cache_dir("sft_data", ChatConfig(), keys) == first
    assert data_cache_dir("sft_data", ChatConfig(seed=7), keys) != first
    monkeypatch.setattr(chat_stage, "CHAT_DATA_VERSION", "next")  # conversations of a newer format: prepared anew
    assert data_cache_dir("sft_data", ChatConfig(), keys) != first


def test_a_resume_is_refused_in_one_line_when_its_start_or_its_data_differ(tmp_path):
    """Before any download: the start checkpoint must hold the resumed run's model (its weights would not load),
    and the data settings must be the ones it trained on (its stream position would name other conversations)."""
    shape = {"sequence_len": 128, "vocab_size": 50265, "n_layer": 2, "n_head": 1, "n_kv_head": 1, "n_embd": 128}
    for name, config in (("base", shape), ("other", {**shape, "n_layer": 4, "sequence_len": 256}),
                         ("resumed", {**shape, "sequence_len": 256})):  # another context alone is the data's to name
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_config.json").write_text(json.dumps(config))
    (tmp_path / "resumed" / "run_info.json").write_text(json.dumps({"chat_config": ChatConfig(seed=7).to_dict()}))
    keys = ("hf_endpoint", "seed")
    check_chat_resume(tmp_path / "resumed", ChatConfig(seed=7, hf_endpoint="http://mirror"), keys,
                      str(tmp_path / "base"), "base_checkpoint", "chat_sft")
    with pytest.raises(ConfigError, match=r"^chat_sft\.base_checkpoint: .*other holds another model than the "
                                          r"checkpoint being resumed, .*resumed: n_layer 4 against 2$"):
        check_chat_resume(tmp_path / "resumed", ChatConfig(seed=7), keys, str(tmp_path / "other"), "base_checkpoint",
                          "chat_sft")
    with pytest.raises(ConfigError, match=r"^ChatConfig\.seed: 42 differs from 7 in the checkpoint being resumed"):
        check_chat_resume(tmp_path / "resumed", ChatConfig(), keys, str(tmp_path / "base"), "base_checkpoint",
                          "chat_sft")


def test_the_chat_commands_refuse_a_device_this_machine_lacks_and_a_save_to_in_their_folders_first(tmp_path,
                                                                                                      base_checkpoint):
    """Before the start checkpoint is fetched and the hub data prepared, as the workflows check."""
    from nanochat_flyte.cli.rl import main as rl_main
    from nanochat_flyte.cli.sft import main as sft_main

    for main, start, owner in ((sft_main, "--base-checkpoint", "ChatConfig"),
                               (rl_main, "--sft-checkpoint", "RLConfig")):
        with pytest.raises(ConfigError, match=rf"^{owner}\.device: 'cuda' was asked for but torch .* sees no cuda "):
            main([start, str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out"), "device=cuda"])
    # a copy inside the checkpoint folder would take the copies before it along, one folder deeper at each save
    with pytest.raises(ConfigError, match=r"^ChatConfig\.save_to: '.*out/copy' is in the checkpoint folder \(out_dir\) "
                                          r".*out: copies of the checkpoint go outside it; choose another folder$"):
        sft_main(["--base-checkpoint", str(base_checkpoint), "--out-dir", str(tmp_path / "out"),
                  f"save_to={tmp_path / 'out' / 'copy'}"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_start").exists()
