"""bench/gpu_acceptance.py on a machine without CUDA: its arguments, its one-line refusal, its pieces (the
section runner, time budgets, the profile's kernel categories, the T4 verdicts, the summary), and that the CUDA
tests it runs are collected and skipped here. The GPU run itself is docs/gpu_acceptance.md's business."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_bench, make_data_dir, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_acceptance.py"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the command runs for real")


acceptance = load_bench("gpu_acceptance")
throughput = load_bench("train_throughput")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@no_cuda
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    result = run_script("--out", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gpu_acceptance: no CUDA device: torch ") and "sees none" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/FILE"], "--out {tmp}/FILE is a file, not a folder"),
    (["--out", "{tmp}/out", "--sections", "tests,speed"], "--sections: unknown section 'speed'"),
    (["--out", "{tmp}/out", "--sections", ","], "--sections: unknown section '(none given)'"),
    (["--out", "{tmp}/out", "--time-limit", "0"], "--time-limit must be > 0 seconds, got 0.0"),
    (["--out", "{tmp}/out", "--sections", "vs_nanochat"], "--sections vs_nanochat needs --nanochat CHECKOUT"),
    (["--out", "{tmp}/out", "--sections", "vs_nanochat", "--nanochat", "{tmp}"],
     "--nanochat {tmp}: no scripts/base_train.py there (a nanochat checkout)"),
])
def test_bad_arguments_get_one_line_before_any_gpu_work(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("")
    assert acceptance.main([arg.format(tmp=tmp_path) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpu_acceptance: {message.format(tmp=tmp_path)}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_out_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        acceptance.main([])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_the_tests_section_collects_the_cuda_tests_and_here_skips_them(tmp_path):
    result_file = tmp_path / "tests.json"
    run = run_script("--section", "tests", "--result", str(result_file), "--work-dir", str(tmp_path))
    result = json.loads(result_file.read_text())
    assert run.returncode == 0 and result["status"] == "completed" and result["pytest_exit_code"] == 0
    names = [test["name"] for test in result["tests"]]
    defined = [line.split("(")[0].removeprefix("def ") for line in (ROOT / "tests" / "test_cuda.py").read_text()
               .splitlines() if line.startswith("def test_")]
    first = acceptance.CUDA_TESTS_FIRST
    assert all(any(name.startswith(prefix) for name in defined) for prefix in first)  # no stale prefix
    rank = {name: next((i for i, prefix in enumerate(first) if name.startswith(prefix)), len(first))
            for name in defined}
    # the tests no GPU has passed yet first, the others in the file's order
    assert list(dict.fromkeys(name.split("[")[0] for name in names)) == sorted(defined, key=rank.get)
    assert len(defined) >= 7 and rank[names[0].split("[")[0]] == 0
    assert "test_the_compiled_decode_step_gives_the_eager_tokens[reduce-overhead]" in names  # one test per case
    if not torch.cuda.is_available():
        assert all(test["outcome"] == "skipped" and "needs a CUDA device" in test["message"]
                   for test in result["tests"])
        assert not any(check["passed"] for check in result["checks"])  # a skip proves nothing


def test_run_process_passes_the_output_on_and_stops_at_the_time_limit():
    lines = []
    assert acceptance.run_process([sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"],
                                  30, lines.append) == 3
    assert lines == ["one", "two"]
    lines.clear()
    start = time.monotonic()
    sleeper = "import time; print('started', flush=True); time.sleep(60)"
    assert acceptance.run_process([sys.executable, "-c", sleeper], 10, lines.append) is None
    assert lines == ["started"] and time.monotonic() - start < 20


def test_a_section_gets_its_budget_and_the_time_earlier_ones_left_over():
    budgets = acceptance.SECTION_BUDGETS_S
    assert set(budgets) == set(acceptance.SECTIONS)
    assert sum(budgets[name] for name in acceptance.DEFAULT_SECTIONS) <= acceptance.DEFAULT_TIME_LIMIT_S
    assert acceptance.section_timeout("tests", ["throughput", "t4"], 500) == 500 - budgets["throughput"] - budgets["t4"]
    assert acceptance.section_timeout("throughput", ["t4"], 200) == budgets["throughput"]
    assert acceptance.section_timeout("t4", [], 40) == 40  # never more than what is left


def test_gpu_busy_time_counts_overlapping_work_once():
    throughput = load_bench("train_throughput")
    # two streams overlap from 3 to 4; a gap from 6 to 8; a kernel inside another
    assert throughput.busy_microseconds([(0.0, 4.0), (3.0, 6.0), (8.0, 10.0), (8.5, 9.0)]) == pytest.approx(8.0)
    assert throughput.busy_microseconds([]) == 0.0


def test_the_carried_gpt2_ranks_win_over_a_tiktoken_cache_dir_without_them(tmp_path):
    """A GPU image may set TIKTOKEN_CACHE_DIR to a folder without the ranks, and have no network: the first run
    on a lent H200 stopped there. Then the checkout's own .cache/tiktoken is used; a folder with them is kept."""
    show_cache_dir = ("import importlib.util, os; "
                      f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r}); "
                      "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
                      "print(os.environ['TIKTOKEN_CACHE_DIR'])")
    with_ranks = tmp_path / "with_ranks"
    with_ranks.mkdir()
    (with_ranks / "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4").write_bytes(b"")
    unset = {key: value for key, value in os.environ.items() if key != "TIKTOKEN_CACHE_DIR"}
    for cache_dir, expected in ((tmp_path, ROOT / ".cache" / "tiktoken"), (with_ranks, with_ranks),
                                (None, ROOT / ".cache" / "tiktoken")):  # unset: main() read it, a KeyError
        env = unset if cache_dir is None else {**unset, "TIKTOKEN_CACHE_DIR": str(cache_dir)}
        result = subprocess.run([sys.executable, "-c", show_cache_dir], capture_output=True, text=True, timeout=120,
                                env=env, check=True)
        assert result.stdout.strip() == str(expected)


def test_the_mfu_if_never_idle_scales_the_measured_mfu_by_busy_over_step_time():
    throughput = load_bench("train_throughput")
    # the H200's profile after the rotary table: 18.91% MFU in 115.9 ms, of which the GPU was busy 76.2 ms
    profile = {"step_ms": 115.9, "gpu_busy_ms": 76.2}
    assert throughput.mfu_if_never_idle(0.1891, profile) == pytest.approx(0.2876, abs=1e-4)
    assert throughput.mfu_if_never_idle(None, profile) is None  # a device without a known peak
    assert "MFU if the GPU were never idle: 28.8%" in throughput.format_profile(
        {**profile, "gpu_idle_percent": 34.3, "mfu_if_never_idle": 0.2876, "categories_ms": {}, "top_kernels": []})


def test_a_profile_that_saw_no_gpu_work_says_so_instead_of_an_idle_gpu():
    """The profiler can miss kernels replayed from CUDA graphs: that is no measurement of an idle GPU."""
    throughput = load_bench("train_throughput")
    blind = {"step_ms": 80.0, "gpu_busy_ms": None, "gpu_idle_percent": None, "categories_ms": {}, "top_kernels": [],
             "note": "the profiler recorded no GPU work"}
    assert throughput.mfu_if_never_idle(0.3, blind) is None
    assert throughput.format_profile(blind) == "profile: 80.0 ms/step; the profiler recorded no GPU work"
    table = acceptance.profile_table(variant(compile_mode="reduce-overhead", profile=blind))
    assert table[-1] == "Profile of the T4 path's step with CUDA graphs: 80.0 ms; the profiler recorded no GPU work."


def test_profile_kernels_fall_into_the_parts_of_a_step():
    Kernel, vocab = throughput.KernelTime, 50304
    kernels = [
        Kernel("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", 400.0, [[8192, 512], [512, vocab]], ""),
        Kernel("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", 300.0, [[8192, 512], [512, 2048]], ""),
        Kernel("triton_tem_fused_mm_0", 100.0, [], ""),
        Kernel("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 150.0, [], ""),
        Kernel("triton_red_fused__log_softmax_div_tanh_0", 250.0, [], ""),
        Kernel("void at::native::vectorized_elementwise_kernel<4, tanh_kernel_cuda>", 50.0, [], ""),
        Kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 120.0, [[512, 512], [512, 512]], "Optimizer.step#Muon.step"),
        Kernel("void at::native::multi_tensor_apply_kernel<FusedAdam>", 30.0, [], "Optimizer.step#AdamW.step"),
        Kernel("triton_poi_fused__to_copy_mul_rsqrt_1", 200.0, [], ""),
        Kernel("triton_poi_fused__to_copy_mul_rsqrt_1", 200.0, [], ""),
    ]
    assert [throughput.kernel_category(kernel, vocab) for kernel in kernels] == [
        "matmul: lm_head (logits)", "matmul: blocks", "matmul: blocks", "attention", "logits softcap + loss",
        "logits softcap + loss", "optimizer step", "optimizer step", "other (memory-bound)", "other (memory-bound)"]

    summary = throughput.summarize_kernels(kernels, steps=2, step_ms=2.0, gpu_microseconds=2000.0,
                                           padded_vocab_size=vocab, top=3)
    assert summary["step_ms"] == pytest.approx(2.0) and summary["gpu_busy_ms"] == pytest.approx(1.0)
    assert summary["gpu_idle_percent"] == pytest.approx(50.0)
    assert summary["categories_ms"] == pytest.approx({
        "matmul: blocks": 0.2, "matmul: lm_head (logits)": 0.2, "attention": 0.075, "logits softcap + loss": 0.15,
        "optimizer step": 0.075, "other (memory-bound)": 0.2, "unattributed": 0.1})
    assert summary["matmul_percent_of_gpu"] == pytest.approx(40.0)
    assert [(k["name"][:12], k["ms"], k["calls_per_step"]) for k in summary["top_kernels"]] == [
        ("nvjet_hsh_25", 0.2, 0.5), ("triton_poi_f", 0.2, 1.0), ("sm90_xmma_ge", 0.15, 0.5)]


@pytest.fixture(scope="module")
def run_without_wandb(tmp_path_factory):
    """A short training run in a process where wandb and rustbpe cannot be imported, as on the device machine."""
    tmp = tmp_path_factory.mktemp("no_wandb")
    data_dir = make_data_dir(tmp / "data", n_train_tokens=20_000, n_val_tokens=2_000)
    code = ("import json, sys\n"
            "sys.modules['wandb'] = sys.modules['rustbpe'] = None  # importing either now fails\n"
            "from pathlib import Path\n"
            "from nanochat_flyte.config import RunConfig\n"
            "from nanochat_flyte.training.pretrain import train\n"
            "train(RunConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))\n")
    config = tiny_config(num_iterations=3, save_every=3, wandb_mode="offline")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(config.to_dict()), str(data_dir), str(tmp / "run")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result, tmp / "run"


def test_training_needs_neither_wandb_nor_rustbpe(run_without_wandb):
    result, run_dir = run_without_wandb
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W&B: the wandb package is not installed; W&B disabled" in result.stderr
    assert json.loads((run_dir / "training_state.json").read_text())["status"] == "completed"


def test_t4_verdicts_from_a_run_finished_or_stopped(run_without_wandb, tmp_path):
    _, run_dir = run_without_wandb
    summary = json.loads((run_dir / "training_state.json").read_text())
    finished = acceptance.t4_results(run_dir, 3, summary)
    assert finished["steps_completed"] == 3 and finished["nonfinite_losses"] == 0
    assert finished["device_batch_size"] == 4 and finished["peak_memory_gib"] is None  # a CPU run
    fit, stable = finished["checks"]
    assert fit["passed"] is False and "ran at device batch 4" in fit["detail"]  # the reference runs at 16
    assert stable["passed"] is True and "3 steps, 0 non-finite losses" in stable["detail"]

    stopped = acceptance.t4_results(run_dir, 300, None)  # the time limit stopped it: nothing decided yet
    assert [c["passed"] for c in stopped["checks"]] == [None, None] and stopped["device_batch_size"] is None
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 4, "train/loss": math.nan, "train/skipped_steps": 1}) + "\n")
    assert acceptance.t4_results(run_dir, 300, None)["checks"][1]["passed"] is False  # a NaN decides it


def variant(dtype="float16", compile=True, loss_chunk_tokens=0, device_batch_size=16, **values) -> dict:
    """A throughput measurement as train_throughput.measure writes it."""
    return {"dtype": dtype, "compile": compile, "loss_chunk_tokens": loss_chunk_tokens,
            "device_batch_size": device_batch_size, "ms_per_step": 80.0, "tok_per_sec": 819200.0, "mfu": 0.274,
            "peak_memory_gib": 9.5, "warmup_s": 41.0, **values}


SIDE_BY_SIDE = {"status": "completed", "shape": {"depth": 8, "seq_len": 512, "device_batch_size": 16,
                                                 "total_batch_size": 65536},
                "dtype": "bfloat16", "nanochat_commit": "92d63d4",
                "nanochat": {"dtype": "bfloat16", "ms_per_step": 100.0, "tok_per_sec": 655360.0, "mfu": None,
                             "peak_memory_gib": 7.25},
                "ours": variant("bfloat16", tok_per_sec=524288.0, ms_per_step=125.0),
                "ours_levers": variant("bfloat16", tok_per_sec=720896.0, ms_per_step=90.9,
                                       compile_mode="reduce-overhead", muon_batched=True, loss_chunk_tokens=2048),
                "ours_t4_path": variant(), "ratio": 0.8, "ratio_levers": 1.1}


def decode_variant(compile_mode: str | None, one_prompt: float) -> dict:
    """An engine measurement as engine_throughput.main writes it (its batch sizes as JSON keys, strings)."""
    return {"compile": compile_mode is not None, "compile_mode": compile_mode, "dtype": "bfloat16",
            "prompt_tokens": 256, "new_tokens": 64, "prefill_ms": 6.5, "one_prompt_decode_tokens_per_sec": one_prompt,
            "decode_tokens_per_sec": {"1": one_prompt * 0.9}}


DECODE = {"status": "completed", "variants": [decode_variant(None, 127.0), decode_variant("default", 450.0),
                                              decode_variant("reduce-overhead", 1500.0)]}


def report_with(sections: dict) -> dict:
    machine = {"device_name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "git_commit": None,
               "environment": {"torch": "2.11.0+cu130", "cuda": "13.0", "python": "3.12.3"}}
    return {"date": "2026-11-27 09:30 UTC", "quick": False, "requested_sections": list(sections),
            "machine": machine, "sections": sections, "wall_s": 300.0, "passed": False}


def test_the_verdict_needs_every_section_completed_and_every_check_passed():
    passing = {"status": "completed", "checks": [acceptance.check("a", True, "")]}
    assert acceptance.overall_passed(report_with({"tests": passing, "t4": passing}))
    for broken in ({"status": "timeout", "checks": [acceptance.check("a", True, "")]},
                   {"status": "completed", "checks": [acceptance.check("a", None, "undecided")]},
                   {"status": "completed", "checks": [acceptance.check("a", False, "")]}):
        assert not acceptance.overall_passed(report_with({"tests": passing, "t4": broken}))
    missing = report_with({"tests": passing})
    missing["requested_sections"].append("t4")
    assert not acceptance.overall_passed(missing)
    # a section whose every measurement failed has no check to fail (it passed so); one failed lever costs only its
    # own figures
    failed = [{"dtype": "float16", "error": "AttributeError: x"}]
    all_failed = {"status": "completed", "variants": [], "checks": [], "failed_variants": failed}
    nanochat_failed = {"status": "completed", "nanochat": {"return_code": 1, "error": "ImportError: y"},
                       "ours": {"tok_per_sec": 1000.0}, "ratio": None}
    for broken in (all_failed, nanochat_failed):
        assert not acceptance.overall_passed(report_with({"tests": passing, "t4": broken}))
    one_lever_failed = {**passing, "variants": [variant()], "failed_variants": failed}
    levers_failed = {"status": "completed", "nanochat": {"tok_per_sec": 900.0}, "ours": {"tok_per_sec": 1000.0},
                     "ours_levers": {"error": "RuntimeError: graph"}, "ratio": 1.11}
    assert acceptance.overall_passed(report_with({"tests": passing, "throughput": one_lever_failed,
                                                  "vs_nanochat": levers_failed}))


def test_the_summary_holds_the_headline_figures_and_null_for_what_was_not_measured():
    profile = {"step_ms": 82.0, "gpu_busy_ms": 60.0, "mfu_if_never_idle": 0.3745}
    throughput_section = {"status": "completed", "variants": [
        variant(loss_chunk_tokens=2048, mfu=0.25), variant("bfloat16", mfu=0.2), variant(profile=profile)]}
    report = report_with({"throughput": throughput_section, "vs_nanochat": SIDE_BY_SIDE, "decode": DECODE})
    summary = acceptance.acceptance_summary(report)
    assert summary == {"device": "NVIDIA H100 80GB HBM3", "commit": None, "t4_path_mfu": 0.274,
                       "t4_path_tok_s": 819200.0, "busy_bound_mfu": 0.3745,
                       "t4_path_best": {"compile_mode": None, "muon_batched": False, "loss_chunk_tokens": 0,
                                        "mfu": 0.274, "tok_s": 819200.0},
                       "one_prompt_decode_tok_s": {"eager": 127.0, "compiled (default)": 450.0,
                                                   "compiled (reduce-overhead)": 1500.0},
                       "vs_nanochat": {"shape": SIDE_BY_SIDE["shape"], "dtype": "bfloat16", "ours_tok_s": 524288.0,
                                       "nanochat_tok_s": 655360.0, "ratio": 0.8, "ours_levers_tok_s": 720896.0,
                                       "ratio_levers": 1.1}}
    nothing = acceptance.acceptance_summary(report_with({"tests": {"status": "completed", "checks": []}}))
    assert nothing["device"] == "NVIDIA H100 80GB HBM3"
    assert [nothing[key] for key in ("t4_path_mfu", "t4_path_tok_s", "busy_bound_mfu")] == [None, None, None]
    assert set(nothing["vs_nanochat"].values()) == {None}
    assert nothing["t4_path_best"] is None and nothing["one_prompt_decode_tok_s"] == {}
    # only the reference's settings count as the T4 path; the best fp16 compiled variant may use any lever
    levers = {"status": "completed", "variants": [
        variant(loss_chunk_tokens=2048), variant(device_batch_size=64, mfu=0.5), variant(muon_batched=True),
        variant(compile_mode="reduce-overhead", muon_batched=True, mfu=0.31), variant("bfloat16", mfu=0.4)]}
    summary = acceptance.acceptance_summary(report_with({"throughput": levers}))
    assert summary["t4_path_mfu"] is None
    assert summary["t4_path_best"] == {"compile_mode": "reduce-overhead", "muon_batched": True, "loss_chunk_tokens": 0,
                                       "mfu": 0.31, "tok_s": 819200.0}


def test_a_variant_that_fails_is_named_with_its_error_and_the_others_keep_their_figures():
    throughput = {"status": "completed", "variants": [variant()], "reference_shape": {
        "depth": 8, "seq_len": 512, "device_batch_size": 16, "total_batch_size": 65536}, "failed_variants": [
        {"dtype": "float16", "compile": True, "compile_mode": "reduce-overhead", "error": "RuntimeError: graph"}]}
    decode = {**DECODE, "failed_variants": [{"flags": "--compile --compile-mode reduce-overhead",
                                             "error": "RuntimeError: replay"}]}
    side_by_side = {**SIDE_BY_SIDE, "ratio_levers": None, "ours_levers": {
        "dtype": "bfloat16", "error": "RuntimeError: graph", "ms_per_step": None, "tok_per_sec": None, "mfu": None,
        "peak_memory_gib": None}}
    report = report_with({"throughput": throughput, "decode": decode, "vs_nanochat": side_by_side})
    text = acceptance.markdown_summary(report)
    assert ('Throughput variant {"dtype": "float16", "compile": true, "compile_mode": "reduce-overhead"} failed: '
            "RuntimeError: graph") in text
    assert "Decode with `--compile --compile-mode reduce-overhead` failed: RuntimeError: replay" in text
    assert "| ours, all the speed levers | bfloat16 | n/a | n/a | n/a | n/a |" in text
    assert "ours, all the speed levers failed: RuntimeError: graph" in text
    assert "with all the speed levers: n/a" in text
    summary = acceptance.acceptance_summary(report)
    assert summary["t4_path_mfu"] == 0.274 and summary["vs_nanochat"]["ratio_levers"] is None
    assert acceptance.decode_checks([]) == []


def test_the_summary_is_a_short_markdown_table():
    profile = {"step_ms": 82.0, "gpu_busy_ms": 60.0, "gpu_idle_percent": 26.8, "mfu_if_never_idle": 0.3745,
               "categories_ms": {"matmul: blocks": 30.0, "optimizer step": 6.0}}
    measured = [variant(profile=profile), variant(loss_chunk_tokens=2048, peak_memory_gib=6.25),
                variant(compile_mode="reduce-overhead", muon_batched=True, loss_chunk_tokens=2048,
                        profile={**profile, "gpu_busy_ms": 75.0, "gpu_idle_percent": 8.5, "mfu_if_never_idle": 0.3})]
    throughput_section = {"status": "completed", "wall_s": 120.0, "variants": measured,
                          "reference_shape": {"depth": 8, "seq_len": 512, "device_batch_size": 16,
                                              "total_batch_size": 65536},
                          "checks": acceptance.throughput_checks([{**v, "device_name": "NVIDIA H100"}
                                                                  for v in measured])}
    text = acceptance.markdown_summary(report_with({"throughput": throughput_section, "vs_nanochat": SIDE_BY_SIDE,
                                                    "decode": DECODE}))
    assert "in bf16: x0.80, with all the speed levers: x1.10" in text
    assert text.startswith("# GPU acceptance: NVIDIA H100 80GB HBM3, 2026-11-27 09:30 UTC\n")
    assert "**NOT PASSED**: 0 of 1 checks passed in 300 s." in text
    assert ("| T4 path (fp16 + GradScaler, compile) at >= 30% MFU on this device | FAIL | 27.4% MFU on NVIDIA H100 |"
            in text)
    header = "| dtype | compile | Muon | loss | ms/step | tokens/s | MFU | peak memory | warm-up |\n" + "|---" * 9
    assert (header + "|\n"
            "| float16 | default | per matrix | plain | 80.0 | 819,200 | 27.4% | 9.50 GiB | 41 s |\n"
            "| float16 | default | per matrix | chunks of 2,048 | 80.0 | 819,200 | 27.4% | 6.25 GiB | 41 s |\n"
            "| float16 | reduce-overhead | batched | chunks of 2,048 | 80.0 | 819,200 | 27.4% | 9.50 GiB | 41 s |\n"
            ) in text
    assert ("Profile of the T4 path's step: 82.0 ms, GPU busy 60.0 ms (27% idle); MFU if the GPU were never idle: "
            "37.5%:") in text
    assert ("Profile of the T4 path's step with CUDA graphs, Muon batched, the loss in chunks of 2,048: 82.0 ms, "
            "GPU busy 75.0 ms (8% idle); MFU if the GPU were never idle: 30.0%:") in text
    assert "| matmul: blocks | 30.00 | 50% |" in text
    assert ("| decode step | prefill, ms | one prompt's decode, tokens/s |\n|---|---|---|\n| eager | 6.5 | 127 |\n"
            "| compiled (default) | 6.5 | 450 |\n| compiled (reduce-overhead) | 6.5 | 1,500 |\n") in text
    assert ("Side by side with nanochat (commit 92d63d4), d8 at context 512, device batch 16, 65,536 tokens per step, "
            "each with its own torch.compile; ours over nanochat in bf16: x0.80") in text
    assert ("| nanochat | bfloat16 | 100.0 | 655,360 | n/a | 7.25 GiB |\n"
            "| ours | bfloat16 | 125.0 | 524,288 | 27.4% | 9.50 GiB |\n"
            "| ours, all the speed levers | bfloat16 | 90.9 | 720,896 | 27.4% | 9.50 GiB |\n"
            "| ours, the T4 path | float16 | 80.0 | 819,200 | 27.4% | 9.50 GiB |\n") in text
