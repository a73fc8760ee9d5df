"""The few lines that end a stage: where its outputs are, the numbers that matter, and commands that still work."""

from pathlib import Path

from nanochat_flyte.config import RunConfig
from nanochat_flyte.pipeline.finish import print_summary

TRAINING = {"run_name": "smoke", "status": "completed", "steps_completed": 40, "total_time_s": 90.0,
            "wandb_url": None}


def test_the_summary_names_the_outputs_and_the_numbers(capsys):
    print_summary("base model", TRAINING, ["val bpb 2.1007"], "/tmp/flyte1/checkpoint", Path("/tmp/flyte2/report"), "",
                  ["nanochat sample --checkpoint /tmp/flyte1/checkpoint --prompt 'Hi'"], local=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== base model: smoke (completed, 40 steps, 1.5 min)"
    assert lines[1].strip() == "val bpb 2.1007"
    assert "   report:     /tmp/flyte2/report/report.md" in lines
    assert "   results:    /tmp/flyte2/report/results.json" in lines
    assert len(lines) < 15  # a few lines a person reads, not the results JSON
    # on a cluster that folder is the pod's own, gone with it: the console has the task's outputs
    print_summary("base model", TRAINING, ["val bpb 2.1007"], "s3://b/checkpoint", Path("/tmp/flyte2/report"), "",
                  [], local=False)
    assert "/tmp/flyte2" not in capsys.readouterr().out


def test_the_next_commands_use_the_save_to_copy(tmp_path, monkeypatch, capsys):
    import nanochat_flyte.pipeline.finish as finish

    monkeypatch.setattr(finish, "publish", lambda *args: None)
    monkeypatch.setattr(finish, "write_run_report", lambda *args, **kwargs: None)
    monkeypatch.setattr(finish, "chat_results", lambda *args: {})
    monkeypatch.setattr(finish, "checkpoint_run_config", lambda *args: RunConfig())
    monkeypatch.setattr(finish, "chat_table_markdown", lambda evaluation: "")  # the files are not under test
    from nanochat_flyte.config import ChatConfig

    finish.finish_chat_run(ChatConfig(save_to="runs/chat"), "runs/base", {**TRAINING, "final_validation_loss": 1.3},
                           {"chatcore": 0.01, "tasks": {"gsm8k": {"accuracy": 0.0}}}, {}, "/tmp/flyte3/checkpoint",
                           tmp_path, local=True)
    out = capsys.readouterr().out
    assert "nanochat chat --checkpoint runs/chat" in out and "--checkpoint /tmp/flyte3" not in out
    assert "val loss 1.3000 | ChatCORE 0.0100 | gsm8k 0.000" in out
    finish.finish_chat_run(ChatConfig(save_to="my runs/chat"), "runs/base", TRAINING, {}, {}, "/tmp/c", tmp_path,
                           local=True)
    assert "nanochat chat --checkpoint 'my runs/chat'" in capsys.readouterr().out  # pasted into a shell as one path


def test_the_next_stage_preset_fits_where_the_run_ran():
    """(After a T4 run the summary suggested the 30-step CPU smoke SFT.)"""
    from nanochat_flyte.pipeline.finish import next_preset

    assert next_preset("chat", {"device": "cpu", "depth": 2}) == "configs/chat_smoke.yaml"
    assert next_preset("chat", {"device": "mps", "depth": 8}) == "configs/chat_smoke.yaml"  # a Mac's smoke run
    assert next_preset("chat", {"device": "cuda", "depth": 2}) == "configs/chat_smoke.yaml"
    assert next_preset("chat", {"device": "cuda", "depth": 8}) == "configs/chat_d8_t4.yaml"
    assert next_preset("rl", {"device": "cuda", "depth": 12}) == "configs/rl_d8_t4.yaml"
    for stage in ("chat", "rl"):
        for training in ({"device": "cpu"}, {"device": "cuda", "depth": 8}):
            assert (Path(__file__).parents[1] / next_preset(stage, training)).is_file()
