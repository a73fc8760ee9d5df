"""GPU acceptance: every CUDA path of the project checked on a real GPU, in one command (docs/gpu_acceptance.md).

    python3 bench/gpu_acceptance.py --out DIR [--sections tests,throughput,t4] [--quick] [--time-limit 480]
                                    [--nanochat CHECKOUT --sections vs_nanochat,...]

Sections, each in a process of its own under a time budget, their results written as they come in:
- tests: the CUDA-only tests (tests/test_cuda.py, marker `cuda`): an fp16 overflow under the GradScaler, bf16,
  compiled vs eager, CUDA graphs with gradient accumulation, pinned prefetch, kill-and-resume, a real out-of-memory
  fallback, KV-cache generation, the compiled decode step.
- throughput: the d8 reference shape (context 512, device batch 16, 65,536 tokens per step, GPT-2 vocabulary)
  in fp16 + GradScaler with torch.compile (the T4 path), then with the speed levers (CUDA graphs, batched Muon,
  the chunked loss), all together and some alone: tokens/s, MFU, peak memory, ms/step; and a torch.profiler
  breakdown of the T4 path's step and of the all-levers one.
- t4: the reference configuration as a T4 would run it (fp16, compile) with the allocator capped at a T4's
  memory, for 300 steps on generated tokens: its peak memory, the device batch it ran at, and fp16 stability
  (no NaN/inf loss, skipped steps, final grad scale).
- decode (only when asked for): one prompt's decode on a random d8, as CUDA graphs, eager and compiled
  (bench/engine_throughput.py).
- vs_nanochat (only when asked for, with --nanochat): nanochat's own training and ours at the reference shape in
  bf16, each with its own compile, and our T4 path beside them: tokens/s and the ratio (bench/vs_nanochat.py).

Writes DIR/<date>_<device>.json (self-describing: device, versions, every check and number, and a summary of the
headline figures), .md (a short summary) and .log (all output). Exits 0 only if every section completed and every
check passed. Where torch sees no CUDA device it refuses in one line. Needs no network: the GPT-2 ranks come from
.cache/tiktoken.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests/ from a bare checkout: the device machine installs nothing
GPT2_RANKS_FILE = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # sha1 of r50k_base's URL: tiktoken's cache name
CARRIED_TIKTOKEN_CACHE = ROOT / ".cache" / "tiktoken"  # where tests/conftest.py keeps them, carried to the GPU
# The checkout's cache unless TIKTOKEN_CACHE_DIR holds the ranks: a GPU image may set one, empty, and have no
# network to fill it; set either way, for the sections' processes and the check in main().
GIVEN_TIKTOKEN_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR", CARRIED_TIKTOKEN_CACHE))
os.environ["TIKTOKEN_CACHE_DIR"] = str(GIVEN_TIKTOKEN_CACHE if (GIVEN_TIKTOKEN_CACHE / GPT2_RANKS_FILE).is_file()
                                       else CARRIED_TIKTOKEN_CACHE)

from bench import train_throughput  # noqa: E402
from bench.train_throughput import SPEED_LEVERS  # noqa: E402
from nanochat_flyte.config import load_config  # noqa: E402
from nanochat_flyte.files import write_json  # noqa: E402
from nanochat_flyte.reporting.environment import environment_report  # noqa: E402
from nanochat_flyte.reporting.tracking import METRICS_FILE, read_logged_records  # noqa: E402

# Seconds each section may take at least (H100 estimates with compilation, rounded up); a section that ends
# early leaves its time to the later ones. Together they fit the default limit.
SECTION_BUDGETS_S = {"tests": 200, "throughput": 170, "t4": 100, "vs_nanochat": 200, "decode": 50}
NANOCHAT_TIMEOUT_S = 110  # of vs_nanochat's 200 s: its compile, data and 20 steps (its H100 d12 step is ~0.3 s)
DEFAULT_SECTIONS = ("tests", "throughput", "t4")  # vs_nanochat needs a nanochat checkout
DEFAULT_TIME_LIMIT_S = 480  # the default sections' budgets, and a little to start, write and stop
MIN_SECTION_S = 20  # less than this left: the section is not started (no GPU work fits)
# tests: first those no GPU has run yet or whose code changed since the H200 run in bench/results/ passed them all,
# so that a section stopped by its budget loses the ones that passed there
CUDA_TESTS_FIRST = ("test_cuda_graphs_", "test_a_run_with_cuda_graphs", "test_the_chunked_loss_",
                    "test_the_compiled_decode_step", "test_an_fp16_overflow_")
REFERENCE = load_config(ROOT / "configs" / "d8_t4.yaml")  # the reference run's configuration

# throughput: the reference config's overrides: the T4 path, then with all of issue 25's levers (both profiled: the
# profiles' rows show each lever's part, batched Muon's in the optimizer's), then all the levers at device batch 64
# (the same 65,536 tokens a step in 2 micro-batches instead of 8: fewer, longer kernels; the plain loss needed 15.5 GiB
# there on the H200, more than a T4 has, and the peak memory says whether the chunked loss fits), and last CUDA graphs
# alone and the chunked loss alone. Each variant compiles for ~25-35 s (less where Inductor's cache has its graphs): a
# section stopped by its time limit keeps what it measured first, so the headline figures come first. Left out: the
# eager paths (2.2-2.4x slower on the H200 in bench/results/) and bf16 (the vs_nanochat section measures it, beside
# nanochat's).
# The levers (train_throughput.SPEED_LEVERS): CUDA graphs, Muon batched by shape, and the chunked loss in chunks of
# 2,048 tokens (22-28% of the plain path's loss memory in bench/loss_memory.py on a CPU).
T4_PATH = {"dtype": "float16", "compile": True}
THROUGHPUT_VARIANTS = (T4_PATH, {**T4_PATH, **SPEED_LEVERS}, {**T4_PATH, **SPEED_LEVERS, "device_batch_size": 64},
                       {**T4_PATH, "compile_mode": SPEED_LEVERS["compile_mode"]},
                       {**T4_PATH, "loss_chunk_tokens": SPEED_LEVERS["loss_chunk_tokens"]})
PROFILED_VARIANTS = (T4_PATH, {**T4_PATH, **SPEED_LEVERS})  # where the step's GPU time goes, before and after
MFU_TARGET = 0.30  # the product's headline: the reference run at >= 30% MFU in fp16

# decode: the engine on a random d8 (context 512, a 256-token prompt, 64 new tokens) with the compiled decode step
# replayed as CUDA graphs (the one setting expected to reach the target: first, so that a short budget keeps it), then
# eager, then compiled without CUDA graphs
DECODE_VARIANTS = (("--compile", "--compile-mode", "reduce-overhead"), (), ("--compile",))
DECODE_TARGET_TOK_S = 400  # issue 25's target for one prompt: a 2.5 ms step, where host-bound decode took 7.9 ms

# t4: a T4 has 15,360 MiB (16.1 GB), of which the CUDA context and the libraries' kernels take several hundred
# MB outside PyTorch's allocator: capping the allocator at 15 GB leaves it about what a T4 would.
T4_ALLOCATOR_CAP_BYTES = 15e9
STABILITY_STEPS, QUICK_STABILITY_STEPS = 300, 60
STABILITY_TRAIN_TOKENS = 2_000_000  # ~4,000 windows of 513 tokens; 300 steps of 65,536 tokens repeat them
EVAL_TOKENS = 2 * 16 * 513  # two full batches at device batch 16: no odd-sized last batch to compile for


# ---------------------------------------------------------------------- small helpers


def refuse(message: str, code: int) -> int:
    print(f"gpu_acceptance: {message}", file=sys.stderr, flush=True)
    return code


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check(name: str, passed: bool | None, detail: str) -> dict:
    """One line of the verdict: passed is None where a timeout left it undecided."""
    return {"name": name, "passed": passed, "detail": detail}


def error_line(error: BaseException) -> str:
    """An exception as one line for the JSON and the markdown (its traceback goes to the log)."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # JSON has no NaN or inf


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def tok_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def milliseconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def free_cuda_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------- section: the CUDA tests


def tests_section(work_dir: Path, record: Callable[[dict], None], args: argparse.Namespace) -> None:
    import pytest

    outcomes: list[dict] = []

    class Recorder:  # a pytest plugin: each result is recorded as soon as pytest has it
        def pytest_collection_modifyitems(self, items):
            items.sort(key=lambda item: next((rank for rank, prefix in enumerate(CUDA_TESTS_FIRST)
                                              if item.name.startswith(prefix)), len(CUDA_TESTS_FIRST)))

        def pytest_runtest_logreport(self, report):
            if report.when != "call" and report.passed:
                return  # setup and teardown count only when they fail or skip
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            outcomes.append({"name": report.nodeid.split("::")[-1], "outcome": outcome,
                             "duration_s": round(report.duration, 2), "message": failure_message(report)})
            record({"tests": outcomes, "checks": [
                check(f"cuda test: {o['name']}", o["outcome"] == "passed",
                      o["message"] or f"{o['outcome']} in {o['duration_s']} s") for o in outcomes]})

    exit_code = pytest.main([str(ROOT / "tests" / "test_cuda.py"), "-m", "cuda", "-q", "-p", "no:cacheprovider",
                             "--basetemp", str(work_dir / "pytest")], plugins=[Recorder()])
    record({"pytest_exit_code": int(exit_code)})
    if exit_code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not outcomes:
        raise RuntimeError(f"pytest could not run the CUDA tests (exit code {int(exit_code)}): see the log")


def failure_message(report) -> str:
    if report.passed:
        return ""
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return report.longrepr[2]
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else report.outcome


# ---------------------------------------------------------------------- section: throughput


def is_t4_path(variant: dict) -> bool:
    """A measurement of the reference run as a T4 runs it: fp16 + GradScaler, compiled, the reference's settings."""
    return (variant["dtype"] == "float16" and variant["compile"]
            and variant.get("compile_mode", REFERENCE.compile_mode) == REFERENCE.compile_mode
            and variant.get("muon_batched", REFERENCE.muon_batched) == REFERENCE.muon_batched
            and variant["loss_chunk_tokens"] == REFERENCE.loss_chunk_tokens
            and variant["device_batch_size"] == REFERENCE.device_batch_size)


def levers(variant: dict) -> dict:
    """A variant's settings of issue 25's levers."""
    return {"compile_mode": variant.get("compile_mode"), "muon_batched": variant.get("muon_batched", False),
            "loss_chunk_tokens": variant["loss_chunk_tokens"]}


def throughput_section(work_dir: Path, record: Callable[[dict], None], args: argparse.Namespace) -> None:
    steps, warmup_steps, profile_steps = (3, 2, 1) if args.quick else (10, 3, 2)
    record({"reference_shape": {"depth": REFERENCE.depth, "seq_len": REFERENCE.max_seq_len,
                                "device_batch_size": REFERENCE.device_batch_size,
                                "total_batch_size": REFERENCE.total_batch_size,
                                "vocab_size": train_throughput.GPT2_VOCAB_SIZE}})
    variants, failed = [], []
    for overrides in THROUGHPUT_VARIANTS:
        config = dataclasses.replace(REFERENCE, device="cuda", **overrides)
        print(f"throughput: {overrides}", flush=True)
        profiled = overrides in PROFILED_VARIANTS
        try:
            variants.append(train_throughput.measure(config, steps, warmup_steps,
                                                     profile=profile_steps if profiled else 0,
                                                     log=lambda line: print(line, flush=True)))
        except Exception as error:  # a lever that breaks on this GPU must not cost the other variants' figures
            traceback.print_exc()
            failed.append({**overrides, "error": error_line(error)})
        record({"variants": variants, "failed_variants": failed, "checks": throughput_checks(variants)})
        torch.compiler.reset()  # drop the compiled graphs (and the model they hold) before the next variant
        free_cuda_memory()


def throughput_checks(variants: list[dict]) -> list[dict]:
    t4_path = [v for v in variants if is_t4_path(v)]
    if not t4_path or t4_path[0]["mfu"] is None:
        return []
    utilisation, device = t4_path[0]["mfu"], t4_path[0]["device_name"]
    return [check(f"T4 path (fp16 + GradScaler, compile) at >= {MFU_TARGET:.0%} MFU on this device",
                  utilisation >= MFU_TARGET, f"{100 * utilisation:.1f}% MFU on {device}")]


# ---------------------------------------------------------------------- section: the T4 rehearsal


def t4_section(work_dir: Path, record: Callable[[dict], None], args: argparse.Namespace) -> None:
    from nanochat_flyte.training.pretrain import train
    from tests.helpers import make_data_dir

    steps = QUICK_STABILITY_STEPS if args.quick else STABILITY_STEPS
    total_memory = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_ALLOCATOR_CAP_BYTES / total_memory))
    record({"memory_cap_gb": T4_ALLOCATOR_CAP_BYTES / 1e9, "steps": steps})
    data_dir = make_data_dir(work_dir / "t4_data", n_train_tokens=STABILITY_TRAIN_TOKENS, n_val_tokens=EVAL_TOKENS)
    config = dataclasses.replace(REFERENCE, device="cuda", dtype="float16", num_iterations=steps,
                                 eval_every=steps, eval_tokens=EVAL_TOKENS, sample_every=steps, save_every=steps,
                                 evaluate_core=False, wandb_mode="disabled", run_name="gpu_acceptance_t4").validate()
    summary = train(config, data_dir, work_dir / "t4_run")
    record({**t4_results(work_dir / "t4_run", steps, summary),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30})


def t4_results(run_dir: Path, steps: int, summary: dict | None) -> dict:
    """The T4 fit and fp16 stability from the run's metrics.jsonl, and from its summary once it has finished
    (summary None: stopped by the time limit, so the device batch and the verdicts may be unknown)."""
    rows = [row for row in read_logged_records(run_dir / METRICS_FILE) if "train/loss" in row]
    losses = [row["train/loss"] for row in rows]
    nonfinite = sum(not math.isfinite(loss) for loss in losses)
    peak = max((row["train/peak_mem_gib"] for row in rows if "train/peak_mem_gib" in row), default=None)
    skipped = rows[-1]["train/skipped_steps"] if rows else None
    scale = rows[-1].get("train/grad_scale") if rows else None
    first = losses[0] if losses else math.nan
    last = sum(losses[-10:]) / len(losses[-10:]) if losses else math.nan
    batch = summary["device_batch_size"] if summary else None

    fits = None if summary is None else batch == REFERENCE.device_batch_size
    if nonfinite:
        stable = False
    elif summary is None:
        stable = None
    else:  # finite all along, every step done, and it learned
        stable = summary["steps_completed"] == steps and last < first
    return {
        "steps_completed": len(losses), "device_batch_size": batch, "peak_memory_gib": peak,
        "nonfinite_losses": nonfinite, "skipped_steps": skipped, "final_grad_scale": scale,
        "first_loss": finite_or_none(first), "last_10_mean_loss": finite_or_none(last),
        "total_time_s": summary["total_time_s"] if summary else None,
        "checks": [
            check(f"T4 fit: reference config (fp16, compile) at device batch {REFERENCE.device_batch_size} under a "
                  f"{T4_ALLOCATOR_CAP_BYTES / 1e9:.0f} GB cap", fits,
                  f"ran at device batch {batch or 'unknown (not finished)'}, peak "
                  + ("unknown" if peak is None else f"{peak:.2f} GiB allocated")),
            check(f"fp16 stability: {steps} steps of d{REFERENCE.depth}, no NaN/inf loss", stable,
                  f"{len(losses)} steps, {nonfinite} non-finite losses, loss {first:.3f} -> {last:.3f} (last 10), "
                  f"{skipped} skipped steps, final grad scale {scale}"),
        ],
    }


# ---------------------------------------------------------------------- section: side by side with nanochat


def vs_nanochat_section(work_dir: Path, record: Callable[[dict], None], args: argparse.Namespace) -> None:
    import vs_nanochat  # bench/, this script's folder

    steps = {"nanochat_steps": 8, "our_steps": 3, "our_warmup_steps": 2} if args.quick else {}
    # nanochat runs first: a slow or stuck start of it must leave time for ours (2 compiles of ~30 s and their
    # steps). The T4 path is the throughput section's first variant when that section runs too.
    vs_nanochat.compare(args.nanochat, work_dir, record, log=lambda line: print(line, flush=True),
                        timeout_s=NANOCHAT_TIMEOUT_S, t4_path="throughput" not in args.sections.split(","),
                        **steps)


# ---------------------------------------------------------------------- section: one prompt's decode


def decode_section(work_dir: Path, record: Callable[[dict], None], args: argparse.Namespace) -> None:
    import engine_throughput  # bench/, this script's folder

    variants, failed = [], []
    for compile_flags in DECODE_VARIANTS:
        print(f"decode: {compile_flags or 'eager'}", flush=True)
        try:
            variants.append(engine_throughput.main(["--device", "cuda", "--batch-sizes", "1", "--new-tokens", "64",
                                                    "--repeats", "2" if args.quick else "3", *compile_flags]))
        except Exception as error:  # as in the throughput section: the other settings still get measured
            traceback.print_exc()
            failed.append({"flags": " ".join(compile_flags), "error": error_line(error)})
        record({"variants": variants, "failed_variants": failed, "checks": decode_checks(variants)})
        torch.compiler.reset()
        free_cuda_memory()


def decode_checks(variants: list[dict]) -> list[dict]:
    if not variants:
        return []
    best = max(v["one_prompt_decode_tokens_per_sec"] for v in variants)
    return [check(f"one prompt decodes at >= {DECODE_TARGET_TOK_S} tokens/s (the fastest engine setting)",
                  best >= DECODE_TARGET_TOK_S, f"{best:,.0f} tokens/s")]


SECTIONS = {"tests": tests_section, "throughput": throughput_section, "t4": t4_section,
            "vs_nanochat": vs_nanochat_section, "decode": decode_section}


def partial_results(name: str, work_dir: Path, quick: bool) -> dict:
    """What a section stopped by its time limit left behind beyond its own records."""
    if name == "t4" and (work_dir / "t4_run" / METRICS_FILE).exists():
        return t4_results(work_dir / "t4_run", QUICK_STABILITY_STEPS if quick else STABILITY_STEPS, None)
    return {}


# ---------------------------------------------------------------------- one section's process


def run_section(name: str, result_file: Path, work_dir: Path, args: argparse.Namespace) -> int:
    result: dict = {"status": "running"}

    def record(update: dict) -> None:
        result.update(update)
        write_json(result_file, result)

    record({})
    try:
        SECTIONS[name](work_dir, record, args)
    except Exception as error:  # the orchestrator reports it and goes on with the next section
        traceback.print_exc()
        record({"status": "error", "error": error_line(error)})
        return 1
    record({"status": "completed"})
    return 0


def run_process(command: list[str], timeout_s: float, log: Callable[[str], None]) -> int | None:
    """Run command, passing each output line to log; None if it outran timeout_s (then it and its children
    are killed: it runs in a process group of its own)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                               bufsize=1, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def pump() -> None:
        for line in process.stdout:
            log(line.rstrip("\n"))

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    try:
        return_code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return_code = None
    pump_thread.join(timeout=10)
    return return_code


def section_timeout(name: str, later: list[str], remaining_s: float) -> float:
    """Its budget, or more when earlier sections left time over; never more than what is left."""
    spare = remaining_s - sum(SECTION_BUDGETS_S[section] for section in later)
    return min(remaining_s, max(SECTION_BUDGETS_S[name], spare))


# ---------------------------------------------------------------------- the report


def describe_machine(commit: str | None) -> dict:
    properties = torch.cuda.get_device_properties(0)
    return {"device_name": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count, "memory_gib": properties.total_memory / 2**30,
            "driver": command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "cudnn": torch.backends.cudnn.version(),
            # the device machine gets the working tree without .git: then the caller names the commit
            "git_commit": commit or command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
            "environment": environment_report()}


def command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def overall_passed(report: dict) -> bool:
    sections = report["sections"].values()
    return (len(report["sections"]) == len(report["requested_sections"])
            and all(section["status"] == "completed" for section in sections)
            and all(c["passed"] is True for section in sections for c in section.get("checks", []))
            and not any(section_failures(section) for section in sections))


def section_failures(section: dict) -> list[str]:
    """Why a section that completed measured nothing it ran for (such a section has no check left to fail): every
    variant failed, or there is no ratio to nanochat (its run, or our bf16 one, failed). One failed lever costs
    only its own figures."""
    if section.get("failed_variants") and not section.get("variants"):
        return [failed["error"] for failed in section["failed_variants"]]
    if "nanochat" in section and section.get("ratio") is None:
        runs = [value for value in section.values() if isinstance(value, dict)]
        return [run["error"] for run in runs if run.get("error")] or ["no ratio to nanochat"]
    return []


def acceptance_summary(report: dict) -> dict:
    """The headline figures, from what this run measured: null where no section measured one (fractions in 0-1)."""
    variants = report["sections"].get("throughput", {}).get("variants", [])
    t4_path = next((variant for variant in variants if is_t4_path(variant)), {})
    # the fastest fp16 compiled variant at the reference's device batch: the T4 path with the levers that help most
    candidates = [v for v in variants if v["dtype"] == "float16" and v["compile"] and v.get("mfu") is not None
                  and v["device_batch_size"] == REFERENCE.device_batch_size]
    best = max(candidates, key=lambda v: v["mfu"], default=None)
    side_by_side = report["sections"].get("vs_nanochat", {})
    return {"device": report["machine"]["device_name"], "commit": report["machine"]["git_commit"],
            "t4_path_mfu": t4_path.get("mfu"), "t4_path_tok_s": t4_path.get("tok_per_sec"),
            "busy_bound_mfu": t4_path.get("profile", {}).get("mfu_if_never_idle"),
            "t4_path_best": best and {**levers(best), "mfu": best["mfu"], "tok_s": best["tok_per_sec"]},
            "one_prompt_decode_tok_s": {decode_setting(v): v.get("one_prompt_decode_tokens_per_sec")
                                        for v in report["sections"].get("decode", {}).get("variants", [])},
            "vs_nanochat": {"shape": side_by_side.get("shape"), "dtype": side_by_side.get("dtype"),
                            "ours_tok_s": side_by_side.get("ours", {}).get("tok_per_sec"),
                            "nanochat_tok_s": side_by_side.get("nanochat", {}).get("tok_per_sec"),
                            "ratio": side_by_side.get("ratio"),
                            "ours_levers_tok_s": side_by_side.get("ours_levers", {}).get("tok_per_sec"),
                            "ratio_levers": side_by_side.get("ratio_levers")}}


def decode_setting(variant: dict) -> str:
    """The engine setting a decode measurement ran with: eager, or the compiled decode step in its mode."""
    return f"compiled ({variant['compile_mode']})" if variant["compile"] else "eager"


def profile_table(variant: dict) -> list[str]:
    """Markdown lines: where a profiled variant's step time goes."""
    profile = variant["profile"]
    gpu, bound, note = profile["gpu_busy_ms"], profile.get("mfu_if_never_idle"), profile.get("note")
    with_levers = [name for name, on in (("CUDA graphs", variant.get("compile_mode") == "reduce-overhead"),
                                         ("Muon batched", variant.get("muon_batched")),
                                         (f"the loss in chunks of {variant['loss_chunk_tokens']:,}",
                                          variant["loss_chunk_tokens"])) if on]
    which = "the T4 path's step" + (f" with {', '.join(with_levers)}" if with_levers else "")
    if gpu is None:
        return ["", f"Profile of {which}: {profile['step_ms']:.1f} ms; {note}."]
    lines = ["", f"Profile of {which}: {profile['step_ms']:.1f} ms, GPU busy {gpu:.1f} ms "
                 f"({profile['gpu_idle_percent']:.0f}% idle)"
                 + ("" if bound is None else f"; MFU if the GPU were never idle: {percent(bound)}")
                 + (f" ({note})" if note else "") + ":",
             "", "| part | ms/step | share of GPU time |", "|---|---|---|"]
    return lines + [f"| {name} | {ms:.2f} | {100 * ms / gpu:.0f}% |" for name, ms in profile["categories_ms"].items()
                    if gpu]


def markdown_summary(report: dict) -> str:
    machine, env = report["machine"], report["machine"]["environment"]
    checks = [c for section in report["sections"].values() for c in section.get("checks", [])]
    verdict = {True: "pass", False: "FAIL", None: "undecided"}
    lines = [f"# GPU acceptance: {machine['device_name']}, {report['date']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, driver {machine['driver']}, Python {env['python']}, "
             f"commit {machine['git_commit'] or 'unknown'}{', --quick' if report['quick'] else ''}. "
             f"**{'PASSED' if report['passed'] else 'NOT PASSED'}**: "
             f"{sum(c['passed'] is True for c in checks)} of {len(checks)} checks passed in {report['wall_s']:.0f} s.",
             "", "| section | status | time |", "|---|---|---|"]
    lines += [f"| {name} | {section['status']}{': ' + section['error'] if section.get('error') else ''} "
              f"| {section.get('wall_s', 0):.0f} s |" for name, section in report["sections"].items()]
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {verdict[c['passed']]} | {c['detail']} |" for c in checks]
    throughput = report["sections"].get("throughput", {})
    if throughput.get("variants"):
        shape = throughput["reference_shape"]
        lines += ["", f"Throughput, d{shape['depth']} at context {shape['seq_len']}, device batch "
                      f"{shape['device_batch_size']}, {shape['total_batch_size']:,} tokens per step:", "",
                  "| dtype | compile | Muon | loss | ms/step | tokens/s | MFU | peak memory | warm-up |",
                  "|" + "---|" * 9]
        lines += [f"| {v['dtype']} | {v.get('compile_mode') or 'default' if v['compile'] else 'no'} | "
                  f"{'batched' if v.get('muon_batched') else 'per matrix'} | "
                  f"{f'chunks of {chunks:,}' if (chunks := v.get('loss_chunk_tokens')) else 'plain'} | "
                  f"{v['ms_per_step']:.1f} | {v['tok_per_sec']:,.0f} | {percent(v['mfu'])} | "
                  f"{gib(v['peak_memory_gib'])} | {v['warmup_s']:.0f} s |" for v in throughput["variants"]]
        for variant in throughput["variants"]:
            if "profile" in variant:
                lines += profile_table(variant)
    lines += [f"\nThroughput variant {json.dumps({k: v for k, v in failure.items() if k != 'error'})} failed: "
              f"{failure['error']}" for failure in throughput.get("failed_variants", [])]
    decode = report["sections"].get("decode", {}).get("variants", [])
    if decode:
        lines += ["", f"The engine on a random d8 (context 512), a {decode[0]['prompt_tokens']}-token prompt, "
                      f"{decode[0]['new_tokens']} new tokens, {decode[0]['dtype']}:", "",
                  "| decode step | prefill, ms | one prompt's decode, tokens/s |", "|---|---|---|"]
        lines += [f"| {decode_setting(v)} | {milliseconds(v['prefill_ms'])} | "
                  f"{tok_s(v.get('one_prompt_decode_tokens_per_sec'))} |" for v in decode]
    lines += [f"\nDecode with `{failure['flags'] or 'eager'}` failed: {failure['error']}"
              for failure in report["sections"].get("decode", {}).get("failed_variants", [])]
    side_by_side = report["sections"].get("vs_nanochat", {})
    if side_by_side.get("shape"):
        shape = side_by_side["shape"]
        ratio, ratio_levers = (side_by_side.get(key) for key in ("ratio", "ratio_levers"))
        lines += ["", f"Side by side with nanochat (commit {side_by_side.get('nanochat_commit') or 'unknown'}), "
                      f"d{shape['depth']} at context {shape['seq_len']}, device batch {shape['device_batch_size']}, "
                      f"{shape['total_batch_size']:,} tokens per step, each with its own torch.compile; ours over "
                      f"nanochat in bf16: {'n/a' if ratio is None else f'x{ratio:.2f}'}, with all the speed levers: "
                      f"{'n/a' if ratio_levers is None else f'x{ratio_levers:.2f}'}", "",
                  "| run | dtype | ms/step | tokens/s | MFU | peak memory |", "|" + "---|" * 6]
        runs = (("nanochat", "nanochat"), ("ours", "ours"), ("ours, all the speed levers", "ours_levers"),
                ("ours, the T4 path", "ours_t4_path"))
        lines += [f"| {name} | {run['dtype']} | {milliseconds(run['ms_per_step'])} | {tok_s(run['tok_per_sec'])} | "
                  f"{percent(run['mfu'])} | {gib(run['peak_memory_gib'])} |"
                  for name, key in runs if (run := side_by_side.get(key))]
        lines += [f"\n{name} failed: {run['error']}" for name, key in runs
                  if (run := side_by_side.get(key)) and run.get("error")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the command


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the JSON, markdown and log (created); required")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, run in the order given, from: {', '.join(SECTIONS)} (default: "
                             f"{','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer timed steps and {QUICK_STABILITY_STEPS} instead of {STABILITY_STEPS} "
                             "stability steps: a short check that the command works")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                        help="seconds for the whole run; a section still running at its share is stopped")
    parser.add_argument("--work-dir", type=Path, help="scratch folder for data and checkpoints (default: a temp "
                                                      "folder, removed at the end)")
    parser.add_argument("--commit", help="the commit under test, for the record (default: git rev-parse HEAD, "
                                         "where the checkout has its .git)")
    parser.add_argument("--nanochat", type=Path, help="an unmodified nanochat checkout, for the vs_nanochat section")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: the section's JSON
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.section:  # a section's own process, started below
        return run_section(args.section, args.result, args.work_dir, args)
    if args.out is None:
        parser.error("the following arguments are required: --out")

    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        return refuse(f"--sections: unknown section {unknown[0] if unknown else '(none given)'!r}; "
                      f"choose from {', '.join(SECTIONS)}", 2)
    if args.out.exists() and not args.out.is_dir():
        return refuse(f"--out {args.out} is a file, not a folder", 2)
    if args.time_limit <= 0:
        return refuse(f"--time-limit must be > 0 seconds, got {args.time_limit}", 2)
    if "vs_nanochat" in sections and args.nanochat is None:
        return refuse("--sections vs_nanochat needs --nanochat CHECKOUT (docs/gpu_acceptance.md)", 2)
    if args.nanochat is not None and not (args.nanochat / "scripts" / "base_train.py").is_file():
        return refuse(f"--nanochat {args.nanochat}: no scripts/base_train.py there (a nanochat checkout)", 2)
    if not torch.cuda.is_available():
        return refuse(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; "
                      "run this on a GPU machine (docs/gpu_acceptance.md)", 1)
    ranks = Path(os.environ["TIKTOKEN_CACHE_DIR"]) / GPT2_RANKS_FILE
    if not ranks.is_file():
        return refuse(f"the GPT-2 ranks are missing at {ranks} and this machine may have no network: run "
                      "`python scripts/cache_gpt2_tokenizer.py` where there is one and bring .cache/tiktoken", 2)

    start = time.monotonic()
    started_at = datetime.now(timezone.utc)
    machine = describe_machine(args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started_at:%Y-%m-%d_%H%M}_{slug(machine['device_name'])}"
    json_path, markdown_path, log_path = (args.out / f"{stem}.{suffix}" for suffix in ("json", "md", "log"))
    report = {"what": "nanochat-flyte GPU acceptance (bench/gpu_acceptance.py)",
              "date": f"{started_at:%Y-%m-%d %H:%M} UTC", "command": " ".join(["python3", *sys.argv]),
              "quick": args.quick, "time_limit_s": args.time_limit, "requested_sections": sections,
              "machine": machine, "sections": {}, "passed": False, "wall_s": 0.0}
    log_lock = threading.Lock()

    def log(line: str) -> None:
        with log_lock, log_path.open("a") as file:
            print(line, flush=True)
            file.write(line + "\n")

    def write_outputs() -> None:
        report["wall_s"] = time.monotonic() - start
        report["passed"] = overall_passed(report)
        report["summary"] = acceptance_summary(report)
        write_json(json_path, report)
        try:
            markdown_path.write_text(markdown_summary(report))
        except Exception as error:  # the JSON holds it all; a summary bug must not stop the GPU run
            markdown_path.write_text(f"The summary could not be written ({type(error).__name__}: {error}); "
                                     f"see {json_path.name}.\n")

    log(f"gpu acceptance on {machine['device_name']}: sections {', '.join(sections)}, limit {args.time_limit:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(sections):
            remaining = args.time_limit - (time.monotonic() - start)
            timeout = section_timeout(name, sections[index + 1:], remaining)
            if timeout < MIN_SECTION_S:
                report["sections"][name] = {"status": "not run", "error": f"the time limit left {remaining:.0f} s"}
                write_outputs()
                continue
            log(f"=== section {name} (at most {timeout:.0f} s)")
            result_file = work_dir / f"{name}.json"
            section_start = time.monotonic()
            return_code = run_process([sys.executable, str(Path(__file__).resolve()), "--section", name,
                                       "--sections", ",".join(sections),  # what the other processes measure
                                       "--result", str(result_file), "--work-dir", str(work_dir),
                                       *(["--quick"] if args.quick else []),
                                       *(["--nanochat", str(args.nanochat.resolve())] if args.nanochat else [])],
                              timeout, log)
            section = json.loads(result_file.read_text()) if result_file.exists() else {"status": "running"}
            if return_code is None:
                section.update({**partial_results(name, work_dir, args.quick), "status": "timeout",
                                "error": f"stopped at its limit of {timeout:.0f} s"})
            elif section["status"] == "running":  # the process died without a word: a crash in native code
                section.update({"status": "crashed", "error": f"exit code {return_code}"})
            section.update({"wall_s": time.monotonic() - section_start, "timeout_s": timeout})
            report["sections"][name] = section
            write_outputs()
    write_outputs()
    log(markdown_path.read_text())
    log(f"results: {json_path} {markdown_path} {log_path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
