"""Tracker: metrics files, W&B offline run read back from its .wandb file, fallbacks, resume, secrecy."""

import json
import logging
import socket

from wandb_offline import read_offline_history, read_offline_summary, run_records

from nanochat_flyte.config import RunConfig
from nanochat_flyte.reporting.tracking import (
    Tracker,
    log_evaluation,
    read_logged_records,
    resolve_mode,
)

STEPS = 100  # enough rows for the .wandb file to span more than one 32 KiB block
EVAL_STEPS = {0, 50, 99}
SAMPLE_STEPS = {50, 99}


def log_synthetic_run(tracker: Tracker) -> None:
    """What the training loop sends: per-step train metrics, periodic evals and samples, a final summary."""
    tracker.log_config({"parameters": 1234, "flops_per_token": 5678})
    for step in range(STEPS):
        tracker.log(step, {"train/loss": 10.0 - step, "train/loss_smooth": 10.5 - step, "train/lrm": 1.0,
                           "train/tok_per_sec": 1000.0 + step, "train/mfu": None, "train/dt": 0.1})
        if step in EVAL_STEPS:
            tracker.log(step, {"val/bpb": 3.0 - step / 10})
        if step in SAMPLE_STEPS:
            tracker.log_samples(step, [{"prompt": "The capital of France is", "completion": f" Paris {step}"}])
    tracker.set_summary({"min_validation_bpb": 2.1, "final_validation_bpb": 2.1, "total_time_s": 1.0,
                         "tokens_seen": 655360})


def test_auto_mode_follows_the_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # nor a `wandb login` on this machine
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_an_evaluation_logs_to_wandb_only_online(tmp_path, monkeypatch):
    """Offline, the evaluation's numbers stay in the results JSON: an offline W&B run of them would be written to a
    temporary folder and deleted with it."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(Tracker, "__init__", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("started")))
    for mode in ("auto", "offline", "disabled"):
        assert log_evaluation(RunConfig(wandb_mode=mode), str(tmp_path), 6, {"core/metric": 0.1}, {}) is None


def test_offline_run_reads_back_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tracker = Tracker(RunConfig(run_name="unit", wandb_mode="auto"), tmp_path, env_report={"python": "3.11"})
    assert tracker.mode == "offline"  # auto without a key
    log_synthetic_run(tracker)
    assert tracker.finish() is None

    assert next(tracker.offline_dir.glob("*.wandb")).stat().st_size > 32 * 1024  # records cross a block
    history = read_offline_history(tracker.offline_dir)
    train_steps = [row["step"] for row in history if "train/loss" in row]
    assert train_steps == list(range(STEPS))
    assert {row["step"] for row in history if "val/bpb" in row} == EVAL_STEPS
    for key in ("train/loss_smooth", "train/lrm", "train/tok_per_sec", "train/dt"):
        assert all(key in row for row in history if "train/loss" in row), key
    assert not any("train/mfu" in row for row in history)  # None values are dropped

    tables = [row["samples"] for row in history if "samples" in row]
    assert [table["nrows"] for table in tables] == [1, 2]  # cumulative: the last table holds every step
    last_table = json.loads((tracker.offline_dir / "files" / tables[-1]["path"]).read_text())
    assert last_table["columns"] == ["step", "prompt", "completion"]
    assert [row[0] for row in last_table["data"]] == sorted(SAMPLE_STEPS)

    summary = read_offline_summary(tracker.offline_dir)
    assert summary["min_validation_bpb"] == 2.1 and summary["tokens_seen"] == 655360

    metrics = read_logged_records(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics if "train/loss" in m] == list(range(STEPS))
    assert all("time" in m and "train/mfu" not in m for m in metrics)
    assert [s["step"] for s in read_logged_records(tmp_path / "samples.jsonl")] == sorted(SAMPLE_STEPS)
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert run_info["parameters"] == 1234 and run_info["config"]["run_name"] == "unit"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket closes


def test_online_without_network_falls_back_offline_and_never_shows_the_key(tmp_path, monkeypatch, capfd,
                                                                             caplog):
    secret = "feedfacecafebeef" * 2 + "deadbeef"  # 40 characters, like a real key
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")  # keep the failing online attempt short
    with caplog.at_level(logging.WARNING, logger="nanochat_flyte.reporting.tracking"):
        tracker = Tracker(RunConfig(run_name="no-network", wandb_mode="online"), tmp_path)
    assert tracker.mode == "offline"
    warnings = [r for r in caplog.records if r.name == "nanochat_flyte.reporting.tracking"]
    assert len(warnings) == 1 and "online init failed" in warnings[0].getMessage()

    log_synthetic_run(tracker)
    assert tracker.finish() is None
    assert [row["step"] for row in read_offline_history(tracker.offline_dir) if "train/loss" in row] == \
        list(range(STEPS))
    # the failed online attempt's folder is gone: `wandb sync --sync-all` would upload it empty under the run's id
    assert [path.name for path in (tmp_path / "wandb").iterdir() if "run-" in path.name] == [tracker.offline_dir.name]

    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_an_evaluation_without_network_is_not_written_offline_to_a_folder_that_is_deleted(tmp_path, monkeypatch,
                                                                                             caplog):
    monkeypatch.setenv("WANDB_API_KEY", "feedfacecafebeef" * 2 + "deadbeef")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    with caplog.at_level(logging.WARNING, logger="nanochat_flyte.reporting.tracking"):
        assert log_evaluation(RunConfig(wandb_mode="online"), str(tmp_path), 6, {"core_metric": 0.1}, {}) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "nanochat_flyte.reporting.tracking"]
    assert "online init failed" in warning and "logging offline" not in warning
    assert warning.endswith("W&B disabled (the results JSON has every number either way)")


def test_every_metric_plots_against_the_training_step(tmp_path):
    tracker = Tracker(RunConfig(run_name="axes", wandb_mode="offline"), tmp_path)
    tracker.log(3, {"rl/reward": 0.5, "core_metric": 0.2})  # prefixes a list of patterns would have to foresee
    tracker.finish()
    metrics = [record.metric for record in run_records(tracker.offline_dir)
               if record.WhichOneof("record_type") == "metric"]
    assert {(metric.name or metric.glob_name, metric.step_metric) for metric in metrics} == {("step", ""),
                                                                                           ("*", "step")}


def test_wandbs_own_step_is_the_training_step(tmp_path):
    """W&B's _step is the training step, not a count of log calls: the train, validation and samples rows of a step
    are one row at that step."""
    tracker = Tracker(RunConfig(run_name="steps", wandb_mode="offline"), tmp_path)
    tracker.log(0, {"val/bpb": 3.0})  # as training does: an evaluation before the first step
    for step in range(1, 7):
        tracker.log(step, {"train/loss": 10.0 - step})
        if step % 3 == 0:
            tracker.log(step, {"val/bpb": 3.0 - step / 10})
            tracker.log_samples(step, [{"prompt": "The capital of France is", "completion": f" Paris {step}"}])
    tracker.finish()
    history = read_offline_history(tracker.offline_dir)
    assert [row["_step"] for row in history] == list(range(7))  # one row per step
    assert all(row["_step"] == row["step"] for row in history)
    assert [row["_step"] for row in history if "train/loss" in row] == list(range(1, 7))
    assert [row["_step"] for row in history if "val/bpb" in row] == [0, 3, 6]
    assert [row["_step"] for row in history if "samples" in row] == [3, 6]


class RecordedRun:
    """A W&B run resumed where its history ends: `step` is the next _step W&B would give; its summary's "step" the
    training step of the last row it has."""

    def __init__(self, step: int, last_training_step: int):
        self.step, self.rows, self.summary = step, [], {"step": last_training_step}

    def log(self, row, step=None):
        self.rows.append((row["step"], self.step if step is None else step))
        self.step = (self.step if step is None else step) + 1


def test_extending_a_finished_run_logs_every_new_step_after_its_evaluations(tmp_path):
    """A run finished at step 6 and scored after it (CORE at W&B's _step 7): its extension's step 7 was dropped as a
    step W&B had. A run resumed from an earlier save still leaves the steps W&B has to metrics.jsonl."""
    config = RunConfig(wandb_mode="disabled")
    extension = Tracker(config, tmp_path / "extended", resume_step=6)
    extension.attach(RecordedRun(step=8, last_training_step=6), "online")
    for step in (7, 7, 8, 9):  # step 7's training row, then its validation row
        extension._wandb_log({"step": step}, step)
    assert extension.run.rows == [(7, 8), (7, 9), (8, 10), (9, 11)]  # (training step, W&B's _step): none dropped
    repeat = Tracker(config, tmp_path / "repeated", resume_step=4)
    # W&B has steps 0..6: the run went on past its save at 4, then stopped
    repeat.attach(RecordedRun(step=7, last_training_step=6), "online")
    for step in (5, 6, 7):
        repeat._wandb_log({"step": step}, step)
    assert repeat.run.rows == [(7, 7)]
    # that extension, stopped at step 9 and resumed from its save at 8: W&B's steps ran ahead of the training steps
    again = Tracker(config, tmp_path / "extended", resume_step=8)
    again.attach(RecordedRun(step=12, last_training_step=9), "online")
    for step in (9, 10, 11):
        again._wandb_log({"step": step}, step)
    assert again.run.rows == [(10, 12), (11, 13)]  # (step 10 was dropped: W&B's _step 12 is past it)


def test_failing_wandb_log_never_fails_training(tmp_path, caplog):
    tracker = Tracker(RunConfig(wandb_mode="offline"), tmp_path)

    def broken_log(*args, **kwargs):
        raise ConnectionError("service went away")

    tracker.run.log = broken_log
    with caplog.at_level(logging.WARNING, logger="nanochat_flyte.reporting.tracking"):
        tracker.log(0, {"train/loss": 1.0})
        tracker.log(1, {"train/loss": 0.9})
    assert tracker.mode == "disabled"  # offline failed, nothing left to fall back to
    assert len([r for r in caplog.records if r.name == "nanochat_flyte.reporting.tracking"]) == 1
    assert [m["step"] for m in read_logged_records(tmp_path / "metrics.jsonl")] == [0, 1]
    assert tracker.finish() is None


def test_resume_truncates_later_steps_and_keeps_the_run_id(tmp_path):
    config = RunConfig(wandb_mode="disabled")
    first = Tracker(config, tmp_path)
    log_synthetic_run(first)
    first.finish()
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 100, "train/lo')  # torn by a crash mid-write

    resumed = Tracker(config, tmp_path, resume_step=60)
    assert resumed.run_id == first.run_id
    assert max(m["step"] for m in read_logged_records(tmp_path / "metrics.jsonl")) == 60
    assert [s["step"] for s in read_logged_records(tmp_path / "samples.jsonl")] == [50]
    assert [row[0] for row in resumed.sample_rows] == [50]  # the cumulative W&B table starts where it left off

    fresh = Tracker(config, tmp_path)
    assert fresh.run_id != first.run_id  # not resuming: a new W&B run


def test_a_resumed_runs_samples_table_shows_hostile_text_escaped(tmp_path):
    """The cumulative W&B samples table that a resumed run rebuilds from samples.jsonl shows the model's text as the
    first session did: control characters (an OSC 52 clipboard write, a right-to-left override) escaped, not raw."""
    config = RunConfig(wandb_mode="disabled")
    first = Tracker(config, tmp_path)
    first.log_samples(3, [{"prompt": "The capital of France is", "completion": " \x1b]52;c;aGk=\x07 \u202eParis"}])
    first.finish()
    resumed = Tracker(config, tmp_path, resume_step=3)
    shown_row = [3, "The capital of France is", " \\x1b]52;c;aGk=\\x07 \\u202eParis"]
    assert resumed.sample_rows == first.sample_rows == [shown_row]
    completions = [s["completion"] for s in read_logged_records(tmp_path / "samples.jsonl")]
    assert completions == [" \x1b]52;c;aGk=\x07 \u202eParis"]


def test_flyte_execution_id_is_the_run_id(tmp_path, monkeypatch):
    """Pretraining's run is the execution's name; its fine-tuning and RL, in the same execution, runs of their own
    (the console links of docs/observability.md point at these names)."""
    monkeypatch.setenv("FLYTE_INTERNAL_EXECUTION_ID", "a8f3kq2xv9")
    assert [Tracker(RunConfig(wandb_mode="disabled"), tmp_path / phase, phase=phase).run_id
            for phase in ("base", "chat", "rl")] == ["a8f3kq2xv9", "a8f3kq2xv9-chat", "a8f3kq2xv9-rl"]


def test_other_ranks_write_nothing(tmp_path):
    tracker = Tracker(RunConfig(wandb_mode="offline"), tmp_path / "out", rank=1)
    log_synthetic_run(tracker)
    assert tracker.mode == "disabled" and tracker.finish() is None
    assert not (tmp_path / "out").exists()


def test_an_evaluation_joins_the_run_that_trained_the_checkpoint_and_leaves_its_environment(tmp_path, monkeypatch):
    """A recovered Flyte execution has another name than the one that trained the checkpoint; and the evaluation's
    process has no environment report, which must not replace the training run's (W&B merges a resumed run's config
    with what init gives). What W&B is asked for is read at its door: the network is not reached here."""
    from nanochat_flyte.reporting import tracking

    (tmp_path / "wandb_run_id").write_text("trained1\n")
    monkeypatch.setenv("FLYTE_INTERNAL_EXECUTION_ID", "recovered2")
    monkeypatch.setenv("WANDB_API_KEY", "feedfacecafebeef" * 2 + "deadbeef")
    asked = {}

    def init(**settings):
        asked.update(settings)
        raise RuntimeError("not reached: this test reads the request only")

    monkeypatch.setattr(tracking.wandb, "init", init)
    assert log_evaluation(RunConfig(wandb_mode="online"), str(tmp_path), 6, {"core_metric": 0.1}, {}) is None
    assert asked["id"] == "trained1" and asked["resume"] == "allow" and set(asked["config"]) == {"config"}
