import errno
import json
import os
import random
import re
import shutil
import stat

import fsspec
import numpy as np
import pytest
import torch
from helpers import make_data_dir

from nanochat_flyte.config import ChatConfig
from nanochat_flyte.errors import ConfigError, UserError
from nanochat_flyte.files import write_json
from nanochat_flyte.model.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_CONFIG_FILE,
    TRAINING_STATE_FILE,
    CheckpointError,
    check_weights_whole,
    load_checkpoint,
    load_model,
    publish_checkpoint,
    read_checkpoint_json,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from nanochat_flyte.model.gpt import GPT, GPTConfig
from nanochat_flyte.pipeline import setup

CPU = torch.device("cpu")
TINY = GPTConfig(sequence_len=16, vocab_size=50257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint directory of a tiny model after one optimizer step, and what went into it."""
    torch.manual_seed(0)
    model = GPT(TINY)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))).backward()
    optimizer.step()
    out = tmp_path / "checkpoint"
    save_checkpoint(out, step=7, model=model, optimizers=[optimizer], grad_scaler=torch.amp.GradScaler("cpu"),
                    loader_state={"windows_consumed": 56}, loop_state={"loss_ema": 1.5}, config={"depth": 1},
                    model_config=TINY)
    shutil.copytree(make_data_dir(tmp_path / "data", 200, 100) / "tokenizer", out / "tokenizer")
    return out, model, optimizer


def test_checkpoint_holds_the_full_training_state(saved):
    out, model, optimizer = saved
    state = load_checkpoint(out)
    assert set(state) == {"step", "model", "optimizers", "grad_scaler", "rng", "loader", "loop", "config",
                          "model_config"}
    assert set(state["rng"]) >= {"torch", "numpy"}
    assert state["step"] == 7 and state["loader"] == {"windows_consumed": 56} and state["loop"] == {"loss_ema": 1.5}
    assert state["config"] == {"depth": 1} and state["model_config"] == TINY.to_dict()
    assert state["grad_scaler"]["scale"] == torch.amp.GradScaler("cpu").state_dict()["scale"]
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    moments = state["optimizers"][0]["state"][0]["exp_avg"]
    assert torch.equal(moments, optimizer.state_dict()["state"][0]["exp_avg"])
    assert json.loads((out / MODEL_CONFIG_FILE).read_text()) == TINY.to_dict()
    assert not list(out.glob(".*.tmp"))  # the atomic write left no temp file behind


def test_rng_states_round_trip_and_leave_pythons_global_random_alone():
    saved = {**rng_states(), "python": random.getstate()}  # (an older checkpoint's, which held Python's too)
    expected = (torch.rand(3), np.random.rand(3))
    drawn = random.random()
    restore_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    # other libraries draw names from it (Flyte 2's local output folders): a resumed run must not repeat them
    assert random.random() != drawn


def test_a_run_saved_on_eight_gpus_restores_the_rng_of_the_gpus_it_resumes_on(monkeypatch):
    """Each process saves one CUDA generator state per GPU it sees; resumed where it sees fewer (one GPU after eight),
    it restores the first ones instead of failing on a GPU that is not there."""
    saved = {**rng_states(), "cuda": [torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(8)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    restore_rng_states(saved)
    assert len(restored) == 1 and torch.equal(restored[0], saved["cuda"][0])


def test_a_torn_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    out, model, optimizer = saved

    def killed_mid_write(state, path):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, step=8, model=model, optimizers=[optimizer], grad_scaler=None, loader_state={},
                        loop_state={}, config={}, model_config=TINY)
    assert load_checkpoint(out)["step"] == 7


def test_a_saved_checkpoint_is_on_disk_before_its_name_points_at_it(saved, monkeypatch):
    """The temp file is fsynced before the rename and the folder after it: after a power loss the name holds the
    previous checkpoint or the new one, never a file the disk had not yet written."""
    out, model, optimizer = saved
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        status = os.fstat(descriptor)
        events.append(("fsync", "folder" if stat.S_ISDIR(status.st_mode) else "file", status.st_ino))
        fsync(descriptor)

    def recorded_replace(source, destination):
        events.append(("replace", os.fspath(destination)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    save_checkpoint(out, step=8, model=model, optimizers=[optimizer], grad_scaler=None, loader_state={},
                    loop_state={}, config={}, model_config=TINY)
    # the temp file synced is the inode the name now points at
    expected = [("fsync", "file", (out / CHECKPOINT_FILE).stat().st_ino), ("replace", os.fspath(out / CHECKPOINT_FILE)),
                ("fsync", "folder", out.stat().st_ino)]
    assert expected in [events[start:start + 3] for start in range(len(events))], events


@pytest.mark.parametrize("load", [load_checkpoint, lambda directory: load_model(directory, CPU)],
                         ids=["load_checkpoint", "load_model"])
@pytest.mark.parametrize("kept", [1 / 3, 0], ids=["a_third", "empty"])
def test_a_checkpoint_cut_short_is_one_line_naming_it(saved, kept, load):
    """A crash or a full disk mid-copy leaves a checkpoint.pt cut short: loading it to resume or to serve says so in
    one line, not in a traceback of torch's zip reader."""
    out, _, _ = saved
    path = out / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * kept)])
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} is cut short or damaged ") as error:
        load(out)
    assert type(error.value).__name__ == "CheckpointError" and "\n" not in str(error.value)


def test_a_copy_that_dies_on_the_weights_never_names_a_newer_step_than_its_weights(saved, tmp_path, monkeypatch):
    """publish_checkpoint copies checkpoint.pt, then training_state.json: a copy cut off in the weights keeps the
    previous step's pair, never a state naming a step whose weights it does not hold."""
    out, model, optimizer = saved
    copy = tmp_path / "copy"
    write_json(out / TRAINING_STATE_FILE, {"steps_completed": 7})
    publish_checkpoint(out, str(copy))
    save_checkpoint(out, step=8, model=model, optimizers=[optimizer], grad_scaler=None, loader_state={},
                    loop_state={}, config={"depth": 1}, model_config=TINY)
    write_json(out / TRAINING_STATE_FILE, {"steps_completed": 8})
    copyfile = shutil.copyfile

    def disk_full_in_the_weights(source, destination):
        if os.path.basename(source) == CHECKPOINT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copyfile(source, destination)

    monkeypatch.setattr(shutil, "copyfile", disk_full_in_the_weights)
    with pytest.raises(OSError, match="No space left on device"):
        publish_checkpoint(out, str(copy))
    assert json.loads((copy / TRAINING_STATE_FILE).read_text())["steps_completed"] == 7
    assert load_checkpoint(copy)["step"] == 7


@pytest.mark.parametrize("as_uri", [False, True])
def test_load_model_from_a_directory_or_an_fsspec_uri(saved, as_uri):
    out, model, _ = saved
    loaded = load_model(out.as_uri() if as_uri else out, CPU)
    assert loaded.config == TINY and not loaded.model.training
    assert loaded.tokenizer.eot_token == 50256 and loaded.phase == "base"
    ids = torch.randint(0, 50257, (1, 8))
    assert torch.equal(loaded.model(ids), model(ids))


def test_load_model_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_FILE):
        load_model(tmp_path, CPU)
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_FILE):
        load_model(tmp_path.as_uri(), CPU)
    with pytest.raises(UserError, match=r"^foo://bucket/run: Protocol not known: foo; a path or an fsspec URI"):
        load_model("foo://bucket/run", CPU)  # a scheme fsspec does not know: one line, not a ValueError's traceback


def test_a_damaged_small_file_of_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "training_state.json").write_text('{"status": "comp')  # cut short mid-copy
    with pytest.raises(CheckpointError, match=r"training_state\.json is damaged \(.*\): not a whole checkpoint"):
        read_checkpoint_json(tmp_path, "training_state.json")


def test_a_stage_refuses_a_start_checkpoint_cut_short_before_it_prepares_anything(tmp_path):
    """SFT and RL read the zip directory at the end of checkpoint.pt (locally or in a store) in their checks, not
    first when they load the weights, after the chat data is prepared."""
    torch.save({"weights": torch.zeros(1000)}, tmp_path / CHECKPOINT_FILE)
    write_json(tmp_path / TRAINING_STATE_FILE, {"phase": "base"})
    check_weights_whole(tmp_path, "base_checkpoint", "chat_sft")
    whole = (tmp_path / CHECKPOINT_FILE).read_bytes()
    (tmp_path / CHECKPOINT_FILE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=r"^chat_sft\.base_checkpoint: .*checkpoint\.pt is cut short or damaged"):
        setup.sft_start(ChatConfig(), str(tmp_path))
    store = fsspec.filesystem("memory")
    store.pipe_file("/cut/checkpoint.pt", whole[:100])
    with pytest.raises(ConfigError, match=r"^chat_rl\.sft_checkpoint: memory://cut/checkpoint\.pt is cut short"):
        check_weights_whole("memory://cut", "sft_checkpoint", "chat_rl")
    (tmp_path / CHECKPOINT_FILE).unlink()
    with pytest.raises(ConfigError, match=r"holds no checkpoint\.pt: not a whole checkpoint"):
        check_weights_whole(tmp_path, "base_checkpoint", "chat_sft")
