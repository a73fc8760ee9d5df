import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import load_bench, make_data_dir, tiny_config

from nanochat_flyte.cli.train import main as train_main
from nanochat_flyte.config import ChatConfig, RunConfig
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.inference.engine import Engine, SamplingParams
from nanochat_flyte.model.checkpoint import check_save_to
from nanochat_flyte.model.device import select_precision
from nanochat_flyte.model.gpt import GPT
from nanochat_flyte.model.optim import build_optimizers
from nanochat_flyte.pipeline import setup
from nanochat_flyte.pipeline.train import OWNER_FILE, packed_attempt, unpacked_attempt
from nanochat_flyte.training import loop
from nanochat_flyte.training.loop import (
    LoopState,
    Trainer,
    TrainingDiverged,
    build_model,
    halved_batch_size,
    make_grad_scaler,
    train_step,
)
from nanochat_flyte.training.pretrain import SAMPLE_PROMPTS, Pretraining, train

SUMMARY_KEYS = {"status", "depth", "num_iterations", "steps_completed", "min_validation_bpb", "final_validation_bpb",
                "tokens_seen", "total_time_s", "avg_tok_per_sec", "avg_mfu", "num_params", "flops_per_token",
                "device", "device_name", "dtype", "skipped_steps", "device_batch_size", "wandb_url"}
TRAIN_KEYS = {"train/loss", "train/loss_smooth", "train/lrm", "train/lr_matrix", "train/lr_embedding",
              "train/lr_unembedding", "train/dt", "train/tok_per_sec", "train/skipped_steps"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(out_dir):
    return [(r["step"], r["train/loss"]) for r in read_jsonl(out_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"), n_train_tokens=20_000, n_val_tokens=2_000)


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """Six steps without interruption: the reference the other runs are compared with."""
    out = tmp_path_factory.mktemp("straight")
    saves = []
    summary = train(tiny_config(), data_dir, out, on_save=saves.append)
    return summary, out, saves


def test_a_run_writes_the_checkpoint_directory_and_its_records(straight_run, capsys):
    summary, out, saves = straight_run
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["steps_completed"] == 6
    assert summary["tokens_seen"] == 6 * 256 and summary["device"] == "cpu" and summary["avg_mfu"] is None
    assert summary["min_validation_bpb"] <= summary["final_validation_bpb"]
    assert json.loads((out / "training_state.json").read_text()) == summary
    for name in ("checkpoint.pt", "model_config.json", "tokenizer/tokenizer.json", "metrics.jsonl", "samples.jsonl",
                 "report.md"):
        assert (out / name).is_file(), name
    assert saves == [out, out]  # the save at step 3 and the final one

    records = read_jsonl(out / "metrics.jsonl")
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(TRAIN_KEYS <= set(r) and "train/mfu" not in r for r in train_records)
    assert [r["step"] for r in records if "val/bpb" in r] == [0, 3, 6]
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [3] * len(SAMPLE_PROMPTS) + [6] * len(SAMPLE_PROMPTS)
    assert "The capital of France is" in {s["prompt"] for s in samples}


def test_a_new_run_never_overwrites_a_checkpoint_and_starts_the_records_of_one_that_saved_none_anew(
        straight_run, data_dir, tmp_path):
    _, straight, _ = straight_run
    shutil.copytree(straight, tmp_path / "used")
    before = {path: path.read_bytes() for path in (tmp_path / "used").rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match=r"^Trainer\.out_dir: .*used already holds a checkpoint \(step 6\); continue "
                                          r"it with resume_dir"):
        train(tiny_config(depth=2, num_iterations=2), data_dir, tmp_path / "used")
    assert {path: path.read_bytes() for path in (tmp_path / "used").rglob("*") if path.is_file()} == before
    # the records of a run stopped before its first save: nothing to continue, so a new run starts them anew
    (tmp_path / "unsaved").mkdir()
    for name in ("metrics.jsonl", "samples.jsonl"):
        shutil.copy(straight / name, tmp_path / "unsaved" / name)
    train(tiny_config(num_iterations=2, eval_every=2, sample_every=2), data_dir, tmp_path / "unsaved")
    assert [r["step"] for r in read_jsonl(tmp_path / "unsaved" / "metrics.jsonl")] == [0, 1, 2, 2]
    assert {s["step"] for s in read_jsonl(tmp_path / "unsaved" / "samples.jsonl")} == {2}


def test_data_prepared_for_another_config_is_refused_before_the_model_is_built(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^RunConfig\.tokenizer: bpe of 65,536 tokens, but the data in .* was "
                                          r"tokenized by gpt2 of 50,265 tokens: prepare it for this config"):
        train(tiny_config(tokenizer="bpe"), data_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^RunConfig\.eval_tokens: 4,096 is more than the 2,000 validation tokens"):
        train(tiny_config(eval_tokens=4096), data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_resume_of_another_model_is_one_line(straight_run, data_dir, tmp_path):
    _, straight, _ = straight_run
    with pytest.raises(ConfigError, match=r"^Trainer\.resume_dir: .* holds another model: n_layer 1 \(this run: 2\), "
                                          r"n_embd 64 \(this run: 128\)$"):
        train(tiny_config(depth=2, num_iterations=8), data_dir, tmp_path / "run", resume_dir=straight)


def test_the_loss_falls(data_dir, tmp_path):
    summary = train(tiny_config(num_iterations=10, eval_every=10, sample_every=10, save_every=10), data_dir, tmp_path)
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert losses[0] == pytest.approx(math.log(50257), rel=0.01)  # the zero-initialised head predicts uniformly
    assert sum(losses[-3:]) / 3 < losses[0] - 3
    val = [r["val/bpb"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "val/bpb" in r]
    assert val[-1] < val[0] and summary["final_validation_bpb"] == val[-1]


def test_an_out_dir_that_cannot_be_made_or_an_unwritable_save_to_fail_before_training(data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^Trainer\.out_dir: cannot create .*file/run': Not a directory"):
        train(tiny_config(), data_dir, tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match=r"^RunConfig\.save_to: cannot write to .*file/copy': Not a directory"):
        train(tiny_config(save_to=str(tmp_path / "file" / "copy")), data_dir, tmp_path / "run")
    # a URI's store is tried with a probe object, not first at the first copy, save_every steps in
    with pytest.raises(ConfigError, match=r"^RunConfig\.save_to: cannot write to 'ftp://127\.0\.0\.1:1/copy': "):
        train(tiny_config(save_to="ftp://127.0.0.1:1/copy"), data_dir, tmp_path / "run")  # (nothing listens on 1)
    with pytest.raises(ConfigError, match=r"^RunConfig\.save_to: foo://bucket/copy: Protocol not known: foo; "):
        train(tiny_config(save_to="foo://bucket/copy"), data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_train_command_refuses_a_save_to_in_its_checkpoint_folder_or_its_data(data_dir, tmp_path):
    # each copy of the folder would take the copies before it along; a checkpoint does not belong among the data
    run = ["--config", str(tmp_path / "config.json"), "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run")]
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    for save_to, what in ((tmp_path / "run", r"the checkpoint folder \(out_dir\)"),
                          (tmp_path / "run" / "copy", r"the checkpoint folder \(out_dir\)"),
                          (data_dir / "copy", r"the data directory \(data_dir\)")):
        with pytest.raises(ConfigError, match=rf"^RunConfig\.save_to: '.*' is in {what} "):
            train_main([*run, f"save_to={save_to}"])
    assert not (tmp_path / "run").exists() and not (data_dir / "copy").exists()


def test_a_writable_uri_save_to_is_probed_and_left_as_it_was():
    store = fsspec.filesystem("memory")
    store.pipe_file("/probed/kept.txt", b"kept")
    check_save_to("memory://probed", "RunConfig")
    assert store.ls("/probed", detail=False) == ["/probed/kept.txt"]


def test_on_a_cluster_a_local_save_to_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """A run's tasks are pods on a cluster: a folder there is a pod's own disk, and its copies would go with it while
    the summary named them. The checks refuse it in one line (a URI passes); a local run takes a folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^RunConfig\.save_to: 'runs/base' is a folder on the task's own disk"):
        setup.base_run(RunConfig(save_to="runs/base"), "", remote=True)
    with pytest.raises(ConfigError, match=r"^ChatConfig\.save_to: 'file:///tmp/chat' is a folder on the task's"):
        setup.probe_stage(ChatConfig(save_to="file:///tmp/chat"), remote=True)
    assert not (tmp_path / "runs").exists()  # refused before it was made
    check_save_to("memory://on-a-cluster", "RunConfig", remote=True)
    check_save_to("runs/base", "RunConfig")  # locally
    assert (tmp_path / "runs" / "base").is_dir()


def test_a_save_to_that_holds_another_runs_checkpoint_is_refused_before_training(data_dir, tmp_path):
    """Its first copy would replace that model. The run that made it may go on writing there (resumed, or a retried
    attempt of the same run)."""
    copy = tmp_path / "copy"
    train(tiny_config(num_iterations=3, save_to=str(copy)), data_dir, tmp_path / "first")
    before = (copy / "checkpoint.pt").read_bytes()
    refused = r"save_to: '.*copy' holds the checkpoint of another run 'test', completed at step 3: this run's copies"
    with pytest.raises(ConfigError, match=r"^RunConfig\." + refused):
        train(tiny_config(run_name="other", save_to=str(copy)), data_dir, tmp_path / "second")
    with pytest.raises(ConfigError, match=r"^RunConfig\." + refused):  # the workflows' check, before any download
        setup.base_run(tiny_config(run_name="", save_to=str(copy)), "")
    with pytest.raises(ConfigError, match=r"^ChatConfig\." + refused):
        setup.probe_stage(ChatConfig(save_to=str(copy)))
    # a new run named as that run (its config.json, say) is refused as well: only a resume continues it
    (tmp_path / "same_name.json").write_text(json.dumps(tiny_config(save_to=str(copy)).to_dict()))
    with pytest.raises(ConfigError, match=r"^RunConfig\." + refused):
        train_main(["--config", str(tmp_path / "same_name.json"), "--data-dir", str(data_dir), "--out-dir",
                    str(tmp_path / "third")])
    assert (copy / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "second" / "checkpoint.pt").exists()
    summary = train(tiny_config(num_iterations=4, save_to=str(copy)), data_dir, tmp_path / "first",
                    resume_dir=tmp_path / "first")
    assert json.loads((copy / "training_state.json").read_text())["steps_completed"] == summary["steps_completed"] == 4
    # resumed under another name, it goes on writing there
    train(tiny_config(run_name="renamed", num_iterations=5, save_to=str(copy)), data_dir, tmp_path / "first",
          resume_dir=tmp_path / "first")
    assert json.loads((copy / "training_state.json").read_text())["run_name"] == "renamed"
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "training_state.json").write_text('{"status": "comp')
    with pytest.raises(ConfigError, match=r"^RunConfig\.save_to: '.*damaged' holds a damaged training_state\.json: "
                                          r"choose another save_to$"):
        setup.base_run(tiny_config(save_to=str(tmp_path / "damaged")), "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_local_run_names_a_device_this_machine_lacks_before_any_download(tmp_path):
    with pytest.raises(ConfigError, match=r"^RunConfig\.device: 'cuda' was asked for but torch .* sees no cuda "):
        setup.base_run(tiny_config(device="cuda", data_url=str(tmp_path / "no data")), "")
    with pytest.raises(ConfigError, match=r"^ChatConfig\.device: 'cuda' was asked for but torch "):
        setup.probe_stage(ChatConfig(device="cuda"))
    setup.check_device_here(tiny_config(device="cuda"), remote=True)  # a cluster's training node checks its own


def test_wall_time_counts_the_final_evaluation_as_it_counts_the_others(data_dir, tmp_path, monkeypatch):
    evaluate = Trainer.evaluate

    def slow_at_the_end(self, step: int) -> None:
        evaluate(self, step)
        if step == self.config.num_iterations:
            time.sleep(3)

    monkeypatch.setattr(Trainer, "evaluate", slow_at_the_end)
    summary = train(tiny_config(num_iterations=1), data_dir, tmp_path)
    assert summary["total_time_s"] >= 3


def test_log_lines_are_nanochat_style(data_dir, tmp_path, capsys):
    train(tiny_config(num_iterations=2), data_dir, tmp_path)
    out = capsys.readouterr().out
    line = re.compile(r"^step 00002/00002 \(100\.00%\) \| loss: \d+\.\d{6} \| lrm: \d\.\d\d \| dt: [\d.]+ms \| "
                      r"tok/sec: [\d,]+ \| mfu: n/a \| total time: [\d.]+m \| eta: [\d.]+m$", re.MULTILINE)
    assert line.search(out), out
    assert re.search(r"^step 00002 \| validation bpb: \d+\.\d{4}", out, re.MULTILINE)
    assert re.search(r"^step 00002 \| sample: 'The capital of France is' -> ", out, re.MULTILINE)


def test_a_context_shorter_than_the_sample_prompts_crops_them_instead_of_failing(data_dir, tmp_path):
    summary = train(tiny_config(max_seq_len=8, num_iterations=2, sample_every=2, sample_max_tokens=4), data_dir,
                    tmp_path)
    assert summary["status"] == "completed"
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["prompt"] for s in samples] == list(SAMPLE_PROMPTS)  # logged whole, cropped for the model only
    assert all(s["completion"] for s in samples)


class Killed(Exception):
    pass


def kill_at_save(path):
    raise Killed


def test_a_killed_and_resumed_run_repeats_the_straight_losses_exactly(straight_run, data_dir, tmp_path):
    _, straight, _ = straight_run
    with pytest.raises(Killed):
        train(tiny_config(), data_dir, tmp_path / "first", on_save=kill_at_save)
    assert json.loads((tmp_path / "first" / "training_state.json").read_text())["steps_completed"] == 3
    summary = train(tiny_config(), data_dir, tmp_path / "resumed", resume_dir=tmp_path / "first")

    assert train_losses(tmp_path / "resumed") == train_losses(straight)  # exact, and no step logged twice
    records = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records if "val/bpb" in r] == [0, 3, 6]
    assert summary["final_validation_bpb"] == straight_run[0]["final_validation_bpb"]
    samples = read_jsonl(tmp_path / "resumed" / "samples.jsonl")
    assert samples == read_jsonl(straight / "samples.jsonl")


def test_residual_scalars_are_trained_saved_resumed_exactly_and_served(data_dir, tmp_path):
    config = tiny_config(residual_scalars=True, scalar_lr=0.5)
    train(config, data_dir, tmp_path / "straight")
    with pytest.raises(Killed):
        train(config, data_dir, tmp_path / "first", on_save=kill_at_save)
    train(config, data_dir, tmp_path / "resumed", resume_dir=tmp_path / "first")
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert json.loads((tmp_path / "straight" / "model_config.json").read_text())["residual_scalars"] is True
    engine = Engine.from_checkpoint(tmp_path / "straight", device="cpu")
    assert engine.model.x0_lambdas.abs().min() > 0  # learned, from 0
    assert engine.generate_batch([[engine.tokenizer.eot_token]], SamplingParams(max_tokens=4))[0].text


def test_out_of_memory_halves_the_device_batch_and_keeps_the_effective_batch(straight_run, data_dir, tmp_path,
                                                                             monkeypatch, capsys):
    forward = GPT.forward

    def forward_with_small_memory(self, idx, *args, **kwargs):  # training batches over 2 rows do not "fit"
        if torch.is_grad_enabled() and idx.size(0) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_with_small_memory)
    summary = train(tiny_config(), data_dir, tmp_path)
    assert summary["device_batch_size"] == 2 and summary["grad_accum_steps"] == 4
    assert "CUDA out of memory: retrying with device_batch_size 2, 4 accumulation steps" in capsys.readouterr().out
    straight = [loss for _, loss in train_losses(straight_run[1])]
    assert [loss for _, loss in train_losses(tmp_path)] == pytest.approx(straight, rel=1e-4)


CPU_MEMORY_CAP = """
import resource, sys
from pathlib import Path
from helpers import tiny_config
from nanochat_flyte.training.pretrain import train
limit = 3 * 2**30  # the address space: Python and torch take ~1 GB of it, a batch of 512 rows' logits 3.3 GB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
summary = train(tiny_config(device_batch_size=512, total_batch_size=512 * 32, num_iterations=1, eval_every=100,
                            sample_every=100), Path(sys.argv[1]), Path(sys.argv[2]))
print(summary["device_batch_size"], summary["grad_accum_steps"], summary["status"])
"""


def test_a_cpu_out_of_memory_halves_the_device_batch_too(data_dir, tmp_path):
    # a real allocation failure: the CPU allocator's, under a cap on the process's memory (a laptop's RAM)
    result = subprocess.run([sys.executable, "-c", CPU_MEMORY_CAP, str(data_dir), str(tmp_path / "run")],
                            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU out of memory: retrying with device_batch_size 256, 2 accumulation steps" in result.stdout
    size, accumulation, status = result.stdout.splitlines()[-1].split()
    assert int(size) * int(accumulation) == 512 and int(size) <= 256 and status == "completed"


def test_out_of_memory_at_device_batch_1_stops_with_a_clear_error(data_dir, tmp_path, monkeypatch):
    def forward_without_memory(self, idx, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(GPT, "forward", forward_without_memory)
    monkeypatch.setattr("nanochat_flyte.training.pretrain.evaluate_bpb", lambda *args, **kwargs: 1.0)
    with pytest.raises(ConfigError, match=r"^RunConfig\.depth: CUDA out of memory at device_batch_size 1"):
        train(tiny_config(device_batch_size=2, total_batch_size=128), data_dir, tmp_path)


def test_out_of_memory_in_the_optimizer_step_stops_with_a_clear_error_and_no_retry(data_dir, tmp_path, monkeypatch,
                                                                                     capsys):
    """The optimizers allocate their state at their first step; a smaller device batch would not shrink it, and a
    re-run would step the optimizers that had already stepped a second time."""
    steps = []

    def step_without_memory(self, *args, **kwargs):
        steps.append(type(self).__name__)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_without_memory)
    with pytest.raises(ConfigError, match=r"^RunConfig\.depth: CUDA out of memory in the optimizer step \(depth 1\)"):
        train(tiny_config(), data_dir, tmp_path)
    assert steps == ["AdamW"] and "retrying" not in capsys.readouterr().out


@pytest.mark.parametrize("size, halved", [(16, 8), (6, 3), (5, 1), (2, 1)])
def test_halved_batch_size_divides_the_batch(size, halved):
    assert halved_batch_size(size) == halved


class Overflowing(torch.nn.Module):
    """loss = factor * sum(weight * inputs): a huge factor overflows the scaled gradients like fp16 would."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.bias = torch.nn.Parameter(torch.zeros(3))
        self.factor = 1.0

    def forward(self, inputs, targets):
        return self.factor * (self.weight * inputs + self.bias).sum()


def test_an_overflowing_fp16_step_is_skipped_by_every_optimizer():
    model = Overflowing()
    optimizers = [torch.optim.SGD([model.weight], lr=0.1), torch.optim.SGD([model.bias], lr=0.1)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    precision = select_precision(torch.device("cpu"), "float32")
    batches = iter([(torch.ones(3), None)] * 4)

    model.factor = 1e38  # x 65536 loss scale: inf in float32
    result = train_step(model, optimizers, batches, 1, precision, scaler, grad_clip=1.0)
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert torch.equal(model.weight, torch.ones(3)) and torch.equal(model.bias, torch.zeros(3))
    assert result.grad_scale == 2.0**16 and scaler.get_scale() == 2.0**15  # the step's scale; then it backs off

    model.factor = 1.0
    result = train_step(model, optimizers, batches, 1, precision, scaler, grad_clip=0.0)
    assert not result.skipped and result.grad_norm == pytest.approx(math.sqrt(6)) and result.grad_scale == 2.0**15
    assert torch.allclose(model.weight, torch.full((3,), 0.9)) and torch.allclose(model.bias, torch.full((3,), -0.1))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gradients_kept_allocated_for_cuda_graphs_train_exactly_as_fresh_ones(dtype):
    """train_step(cuda_graphs=True) keeps every .grad between steps and adds into it (a CUDA graph's output must not
    become a .grad); the steps are bit for bit those of fresh gradients, through the GradScaler too."""
    config = tiny_config(dtype=dtype, grad_clip=1.0)
    precision = select_precision(torch.device("cpu"), dtype)
    tokens = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    runs = []
    for cuda_graphs in (False, True):
        model = build_model(config, 300, torch.device("cpu"))
        optimizers, scaler = build_optimizers(model, config), make_grad_scaler(precision, torch.device("cpu"))
        batches = iter([(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])] * 3)
        results = [train_step(model, optimizers, batches, 2, precision, scaler, config.grad_clip,
                              cuda_graphs=cuda_graphs) for _ in range(3)]
        kept = [p.grad for p in model.parameters()]
        assert all(grad is not None and not grad.any() for grad in kept) if cuda_graphs else kept == [None] * len(kept)
        runs.append((results, [p.detach().clone() for p in model.parameters()]))
    (fresh, fresh_weights), (reused, reused_weights) = runs
    assert reused == fresh and reused[-1].loss < reused[0].loss
    assert all(torch.equal(a, b) for a, b in zip(fresh_weights, reused_weights, strict=True))


def test_the_throughput_bench_runs_the_train_step(capsys):
    bench = load_bench("train_throughput")
    result = bench.main(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
                         "--steps", "2", "--warmup-steps", "1", "--device", "cpu"])
    assert result["tok_per_sec"] > 0 and result["mfu"] is None and result["t4_reference_minutes"] is None
    out = capsys.readouterr().out
    assert "2 accumulation steps" in out and "MFU: n/a" in out


def test_a_checkpoint_saved_before_the_best_metric_was_renamed_resumes(tmp_path):
    """Checkpoints written before RL's higher-is-better metric call the loop's best value min_val_metric."""
    data_dir = make_data_dir(tmp_path / "data")
    first = train(tiny_config(num_iterations=3, eval_every=3, sample_every=3, save_every=3), data_dir, tmp_path / "old")
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    state["loop"]["min_val_metric"] = state["loop"].pop("best_val_metric")
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    resumed = train(tiny_config(num_iterations=6, eval_every=3, sample_every=6, save_every=3), data_dir,
                    tmp_path / "new", resume_dir=tmp_path / "old")
    assert resumed["steps_completed"] == 6
    assert resumed["min_validation_bpb"] == min(first["min_validation_bpb"], resumed["final_validation_bpb"])


def test_tokens_seen_and_throughput_count_each_steps_own_batch_across_a_resume(straight_run, data_dir, tmp_path):
    """A run resumed with another total_batch_size has seen the old batch's tokens before it and the new one's
    after: not every step at the new size."""
    _, straight, _ = straight_run  # 6 steps of 256 tokens
    shutil.copytree(straight, tmp_path / "run")
    summary = train(tiny_config(num_iterations=8, total_batch_size=512, eval_every=8, sample_every=8, save_every=8),
                    data_dir, tmp_path / "run", resume_dir=tmp_path / "run")
    assert summary["tokens_seen"] == 6 * 256 + 2 * 512
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["loop"]
    assert saved["timed_tokens"] == 5 * 256 + 1 * 512  # each session's first step is not timed (warm-up)
    assert summary["avg_tok_per_sec"] == pytest.approx(saved["timed_tokens"] / saved["timed_seconds"])


def test_resuming_a_checkpoint_cut_short_is_one_error_line(straight_run, data_dir, tmp_path):
    """`nanochat train --resume-dir` of a checkpoint.pt cut short (a crash mid-copy) fails in one line naming the
    file, with a usage error's status, not a traceback of torch's zip reader."""
    _, straight, _ = straight_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:checkpoint.stat().st_size // 3])
    command = [sys.executable, "-m", "nanochat_flyte", "train", "--config",
               str(run / "config.json"), "--data-dir", str(data_dir), "--out-dir", str(run), "--resume-dir", str(run),
               "num_iterations=8"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.fullmatch(rf"error: {re.escape(str(checkpoint))} is cut short or damaged \([\d,]+ bytes\): [^\n]*\n",
                        result.stderr), result.stderr[-2000:]


def test_a_resume_takes_the_precision_and_the_device_batch_it_is_given(data_dir, tmp_path):
    train(tiny_config(num_iterations=3), data_dir, tmp_path / "first")  # float32: the checkpoint has no grad scaler
    # on a T4 (fp16 and its GradScaler), with a smaller device batch, as an out-of-memory error under DDP advises
    resumed = train(tiny_config(dtype="float16", device_batch_size=2), data_dir, tmp_path / "resumed",
                    resume_dir=tmp_path / "first")
    assert resumed["steps_completed"] == 6 and resumed["dtype"] == "float16" and resumed["device_batch_size"] == 2


def test_a_resume_with_fewer_iterations_than_done_is_refused_before_training(data_dir, tmp_path):
    train(tiny_config(num_iterations=3), data_dir, tmp_path / "first")
    config = tiny_config(num_iterations=2)
    with pytest.raises(ConfigError, match=r"^RunConfig.num_iterations: 2 is fewer than the 3 steps the checkpoint"):
        Trainer(config, Pretraining(config, data_dir), tmp_path / "resumed", resume_dir=tmp_path / "first")


def test_a_run_resumed_to_end_at_a_running_save_evaluates_and_samples_its_last_step_whatever_its_schedule(data_dir,
                                                                                                           tmp_path):
    class Stopped(Exception):
        pass

    def stop(_):
        raise Stopped

    with pytest.raises(Stopped):  # eval and samples every 3 steps, saved at step 4, then stopped
        train(tiny_config(num_iterations=8, save_every=4), data_dir, tmp_path / "run", on_save=stop)
    summary = train(tiny_config(num_iterations=4, save_every=4), data_dir, tmp_path / "run",
                    resume_dir=tmp_path / "run")
    evaluated = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/bpb" in row]
    assert [row["step"] for row in evaluated] == [0, 3, 4]
    assert summary["final_validation_bpb"] == evaluated[-1]["val/bpb"]
    assert sorted({row["step"] for row in read_jsonl(tmp_path / "run" / "samples.jsonl")}) == [3, 4]
    # a finished run resumed at its own length evaluates nothing again
    train(tiny_config(num_iterations=4, save_every=4), data_dir, tmp_path / "run", resume_dir=tmp_path / "run")
    assert [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/bpb" in row] == [0, 3, 4]
    # what was done at the saved step is the saving run's schedule: every 2 steps now would have had step 4 done
    with pytest.raises(Stopped):
        train(tiny_config(num_iterations=8, save_every=4), data_dir, tmp_path / "again", on_save=stop)
    summary = train(tiny_config(num_iterations=4, save_every=4, eval_every=2, sample_every=2), data_dir,
                    tmp_path / "again", resume_dir=tmp_path / "again")
    evaluated = [row for row in read_jsonl(tmp_path / "again" / "metrics.jsonl") if "val/bpb" in row]
    assert [row["step"] for row in evaluated] == [0, 3, 4]
    assert summary["final_validation_bpb"] == evaluated[-1]["val/bpb"]
    assert sorted({row["step"] for row in read_jsonl(tmp_path / "again" / "samples.jsonl")}) == [3, 4]


def test_save_to_takes_a_file_uri(data_dir, tmp_path):
    copy = tmp_path / "copies" / "deep"  # does not exist yet
    train(tiny_config(num_iterations=3, save_to=copy.as_uri()), data_dir, tmp_path / "run")
    saved = {path.relative_to(copy).as_posix() for path in copy.rglob("*") if path.is_file()}
    assert {"checkpoint.pt", "config.json", "tokenizer/tokenizer.json", "metrics.jsonl"} <= saved
    assert (copy / "checkpoint.pt").read_bytes() == (tmp_path / "run" / "checkpoint.pt").read_bytes()


def test_the_save_to_copy_ends_as_the_run_does_and_a_resume_from_it_leaves_its_results_behind(data_dir, tmp_path):
    """The last copy comes after the W&B run has closed and the report is written: it holds the whole offline run,
    the final state and the report card. The workflows then write results.json there, which is not the results of a
    run resumed from that copy."""
    copy, run = tmp_path / "copy", tmp_path / "run"
    summary = train(tiny_config(num_iterations=3, save_to=str(copy), wandb_mode="offline"), data_dir, run)
    assert summary["wandb_mode"] == "offline"
    for name in ("training_state.json", "report.md", "loss.png"):
        assert (copy / name).read_bytes() == (run / name).read_bytes(), name
    logs = {path.relative_to(run): path.stat().st_size for path in (run / "wandb").rglob("*.wandb")}
    assert logs and {path: (copy / path).stat().st_size for path in logs} == logs
    (copy / "results.json").write_text("{}")
    train(tiny_config(num_iterations=4), data_dir, tmp_path / "resumed", resume_dir=copy)
    assert not (tmp_path / "resumed" / "results.json").exists()


def test_a_diverged_evaluation_is_no_best(data_dir, tmp_path, monkeypatch, capsys):
    values = iter([2.0, float("nan"), 3.0, float("nan"), 2.5, 3.5])  # the evaluations of steps 0, 3 and 6, twice
    monkeypatch.setattr(Pretraining, "evaluate", lambda self, *args: next(values))
    summary = train(tiny_config(), data_dir, tmp_path / "run")
    assert summary["min_validation_bpb"] == 2.0 and summary["final_validation_bpb"] == 3.0
    summary = train(tiny_config(), data_dir, tmp_path / "nan_first")  # a first evaluation of NaN has no best yet
    assert summary["min_validation_bpb"] == 2.5 and "validation bpb: nan (best n/a)" in capsys.readouterr().out


def test_weights_gone_nan_never_land_on_a_save_and_stop_the_run(data_dir, tmp_path, monkeypatch):
    """A NaN gradient after a finite loss, or a loss that goes NaN within the last DIVERGED_AFTER_STEPS steps, leaves
    NaN weights in bf16 or fp32: the run stops in one line at its next save or at its end, and the last checkpoint
    stays the last good one."""
    step_once = Trainer.optimizer_step

    def nan_after_step(self, step):
        result = step_once(self, step)
        if step + 1 == self.poisoned_at:  # the weights the next step (a save here) would keep
            next(self.model.parameters()).data.fill_(float("nan"))
        return result

    monkeypatch.setattr(Trainer, "optimizer_step", nan_after_step)
    for poisoned_at, saved, out in ((6, 3, tmp_path / "at_a_save"), (8, 6, tmp_path / "at_the_end")):
        monkeypatch.setattr(Trainer, "poisoned_at", poisoned_at, raising=False)
        with pytest.raises(TrainingDiverged) as diverged:
            train(tiny_config(num_iterations=8, save_every=3, eval_every=8, sample_every=8), data_dir, out)
        assert str(diverged.value).startswith(f"training diverged: the weights hold inf/NaN at step {poisoned_at}; its "
                                              f"last checkpoint before that (step {saved}) is in {out}")
        assert json.loads((out / "training_state.json").read_text())["steps_completed"] == saved
        weights = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        assert all(tensor.isfinite().all() for tensor in weights.values())


def test_an_fp16_run_killed_and_resumed_repeats_its_losses_and_grad_scales(data_dir, tmp_path, monkeypatch):
    """The T4 path's preemption: the GradScaler's state is saved and restored. Its first scale here is 2**24, so
    that the early steps overflow and halve it; a resumed run with a fresh scale would skip steps again."""
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        functools.partialmethod(torch.amp.GradScaler.__init__, init_scale=2.0**24))
    config = tiny_config(dtype="float16")
    train(config, data_dir, tmp_path / "straight")
    with pytest.raises(Killed):
        train(config, data_dir, tmp_path / "first", on_save=kill_at_save)
    train(config, data_dir, tmp_path / "resumed", resume_dir=tmp_path / "first")
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")

    def scales(run: str) -> list:
        return [r["train/grad_scale"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]

    assert scales("resumed") == scales("straight") and scales("straight")[-1] < 2.0**24  # it was halved


def test_ctrl_c_before_the_first_save_says_there_is_nothing_to_resume_from(data_dir, tmp_path, monkeypatch, capsys):
    def interrupted(self, step, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "log_step", interrupted)  # Ctrl-C during the first step's log line
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(save_every=100), data_dir, tmp_path)
    assert ("interrupted at step 1, before the first checkpoint (saved every 100 steps): nothing to resume from"
            in capsys.readouterr().out)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_an_fp16_run_whose_forward_overflows_for_good_stops_in_one_line_keeping_its_last_save(data_dir, tmp_path,
                                                                                             monkeypatch):
    """The T4 path's divergence: matrix_lr 1000 grows the MLP's inputs until relu(x)^2 passes fp16's 65504. The forward
    pass then gives inf/NaN whatever the loss scale, the GradScaler skips every step, and the run would go on to its
    end doing nothing. It stops instead, and no save lands while the loss is NaN."""
    monkeypatch.setattr(loop, "DIVERGED_AFTER_STEPS", 2)  # (20 in a run; fp16 is slow on a CPU)
    out = tmp_path / "run"
    config = tiny_config(dtype="float16", matrix_lr=1000.0, device_batch_size=8, num_iterations=30, eval_every=30,
                         sample_every=30, save_every=3)
    with pytest.raises(TrainingDiverged) as diverged:
        train(config, data_dir, out)
    first = int(re.search(r"since step (\d+)", str(diverged.value))[1])
    saved = json.loads((out / "training_state.json").read_text())["steps_completed"]
    assert str(diverged.value) == (
        f"training diverged: the loss has been nan since step {first} (2 steps in a row); its last checkpoint before "
        f"that (step {saved}) is in {out}. Lower the learning rates (embedding_lr, unembedding_lr, matrix_lr) or raise "
        "warmup_ratio, and train again")
    assert 0 < saved < first
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, first + 2))
    assert all(math.isnan(r["train/loss"]) and r["train/skipped_steps"] > 0 for r in rows[first - 1:])
    # the smoothed loss holds its last value through the NaN steps, rather than NaN for the rest of the run
    assert all(r["train/loss_smooth"] == rows[first - 2]["train/loss_smooth"] for r in rows[first - 1:])


def test_the_smoothed_loss_leaves_out_inf_and_nan():
    state, reference = LoopState(device_batch_size=1), LoopState(device_batch_size=1)
    for loss in (4.0, float("nan"), 3.0, float("inf"), 2.0):
        state.fold_loss(loss)
    for loss in (4.0, 3.0, 2.0):
        reference.fold_loss(loss)
    assert state.smoothed_loss() == reference.smoothed_loss() and state.loss_ema_steps == 3
    assert math.isnan(LoopState(device_batch_size=1).smoothed_loss())  # nothing folded yet


def test_an_attempts_packed_save_is_resumed_by_its_owner_only(tmp_path):
    """Flyte 2's local intra-task checkpoint is one file for every task of a run, and of any run given the same raw
    data path: a task resumes only the save it made, and the save's bookkeeping never reaches the checkpoint."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "checkpoint.pt").write_bytes(b"weights")
    (checkpoint / OWNER_FILE).write_text("a stale owner")  # from a restored save: not packed twice
    with packed_attempt(checkpoint, "run-1/train_base_model") as archive:
        with tarfile.open(archive) as tar:
            assert sorted(tar.getnames()) == sorted([OWNER_FILE, "checkpoint.pt"])
            for restored in ("restored_by_run_1", "restored_by_run_2"):
                tar.extractall(tmp_path / restored, filter="data")
    assert not archive.exists()
    mine = unpacked_attempt(tmp_path / "restored_by_run_1", "run-1/train_base_model")
    assert sorted(path.name for path in mine.iterdir()) == ["checkpoint.pt"]
    assert unpacked_attempt(tmp_path / "restored_by_run_2", "run-2/train_base_model") is None
    assert unpacked_attempt(tmp_path / "restored_by_run_2", "run-1/train_chat_model") is None
    assert unpacked_attempt(checkpoint.parent / "missing", "run-1/train_base_model") is None
    assert unpacked_attempt(None, "run-1/train_base_model") is None
