"""Side by side with nanochat: its own training and ours at the same shape on this machine, tokens/s and the ratio.

    python3 bench/vs_nanochat.py --nanochat DIR [--out FILE.json] [--device cuda] [--nanochat-steps 20]

DIR is an unmodified checkout of nanochat (github.com/karpathy/nanochat, MIT), never part of this repository
(docs/gpu_acceptance.md says how to bring one as the ignored folder .nanochat/). It runs as it is, `python -m
scripts.base_train`, at the reference shape (depth 8, context 512, device batch 16, 65,536 tokens a step) in bf16
with its own torch.compile. Ours: the real train_step at the same shape in bf16, compiled (bench/train_throughput.py),
with the defaults and with all the speed levers (train_throughput.SPEED_LEVERS), and the T4 path (fp16 + GradScaler,
compiled) beside them. bench/gpu_acceptance.py runs this as its `vs_nanochat` section and puts the ratios in its
summary.

nanochat runs offline here with nothing of it changed; what it would download or train first is made for it:
- its data: parquet files with a `text` column in $NANOCHAT_BASE_DIR/base_data_climbmix (the last one is its
  validation split), written here from generated English documents a few hundred tokens long, like web pages.
  nanochat tokenizes and packs them itself while it trains, as it does its own data.
- its tokenizer: a pickled tiktoken Encoding and the byte length of every token, in $NANOCHAT_BASE_DIR/tokenizer,
  which its tokenizer training writes. Here: GPT-2's ranks (as ours) with nanochat's special tokens, read from its
  source; both models then have GPT-2's vocabulary in an embedding and head padded to 50,304 rows.
- wandb and rustbpe, imported at the top of its modules and used only for W&B logging (off: `--run dummy`) and to
  train a tokenizer: where they are not installed, empty modules stand in for them.
- Flash Attention 3 comes from the Hugging Face hub: offline, nanochat uses PyTorch's SDPA, as ours does. Its
  default attention pattern has sliding windows, which SDPA runs with a mask; `--window-pattern L` gives every
  layer the full context, as ours.
Its step time (dt, each step synchronised) includes its loader's tokenizing and packing between micro-batches;
ours times random tokens (in training our loader prefetches pre-tokenized shards).
"""

import argparse
import ast
import contextlib
import dataclasses
import gc
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests/ from a bare checkout
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / ".cache" / "tiktoken"))  # GPT-2's ranks, offline

from bench import train_throughput  # noqa: E402
from nanochat_flyte.config import RunConfig  # noqa: E402
from nanochat_flyte.data.tokenizer import (  # noqa: E402
    gpt2_tokenizer,
    mergeable_ranks,
    token_byte_lengths,
    with_special_tokens,
)
from nanochat_flyte.files import write_json  # noqa: E402
from nanochat_flyte.model.device import mfu, peak_flops  # noqa: E402
from tests.helpers import generated_documents  # noqa: E402

NANOCHAT_STEPS, NANOCHAT_WARMUP_STEPS = 20, 5  # its step 0 compiles; the first few run slow after it
OUR_STEPS, OUR_WARMUP_STEPS = 10, 3  # as the acceptance's throughput section
# Documents: 20 generated ones (~30 tokens each) joined, ~600 tokens like a web page; 2,000 make ~1.2M tokens,
# which nanochat's loader cycles through as often as the steps need.
SENTENCE_GROUPS_PER_DOCUMENT, TRAIN_DOCUMENTS, VAL_DOCUMENTS = 20, 2000, 100
ROW_GROUP_DOCUMENTS = 256
# nanochat's module-level imports that serve only W&B logging and tokenizer training
STAND_IN_MODULES = ("wandb", "rustbpe")
BOOTSTRAP = f"""
import importlib.util, runpy, sys, types
for name in {STAND_IN_MODULES!r}:
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = types.ModuleType(name)
sys.argv = ["scripts/base_train.py", *sys.argv[1:]]
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
"""
STEP_LINE = re.compile(r"^step (\d+)/(\d+) .*\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)")
FLOPS_LINE = re.compile(r"^Estimated FLOPs per token: ([\d.e+-]+)")
PEAK_MEMORY_LINE = re.compile(r"^Peak memory usage: ([\d.]+)MiB")
PARAMETERS_LINE = re.compile(r"^total\s*: ([\d,]+)$")  # the last of its "Parameter counts:"


def shape(config: RunConfig) -> dict:
    return {"depth": config.depth, "seq_len": config.max_seq_len, "device_batch_size": config.device_batch_size,
            "total_batch_size": config.total_batch_size}


# ---------------------------------------------------------------------- nanochat's home: data and tokenizer


def nanochat_special_tokens(checkout: Path) -> list[str]:
    """SPECIAL_TOKENS of the checkout's nanochat/tokenizer.py, read from its source (importing it needs rustbpe)."""
    tree = ast.parse((checkout / "nanochat" / "tokenizer.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SPECIAL_TOKENS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{checkout / 'nanochat' / 'tokenizer.py'} defines no SPECIAL_TOKENS")


def write_tokenizer(folder: Path, special_tokens: list[str]) -> int:
    """nanochat's tokenizer files for GPT-2's ranks and its special tokens; returns the vocabulary size."""
    gpt2 = gpt2_tokenizer()
    encoding = with_special_tokens("gpt2", gpt2._pat_str, mergeable_ranks(gpt2), special_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    torch.save(torch.tensor(token_byte_lengths(encoding), dtype=torch.int32), folder / "token_bytes.pt")
    return encoding.n_vocab


def write_documents(folder: Path) -> list[Path]:
    """A train and a validation parquet file of generated documents, in nanochat's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentences = generated_documents(seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, count in enumerate((TRAIN_DOCUMENTS, VAL_DOCUMENTS)):  # sorted by name: the last is validation
        documents = [" ".join(next(sentences) for _ in range(SENTENCE_GROUPS_PER_DOCUMENT)) for _ in range(count)]
        files.append(folder / f"shard_{index:05d}.parquet")
        pq.write_table(pa.table({"text": documents}), files[-1], row_group_size=ROW_GROUP_DOCUMENTS)
    return files


def prepare_home(home: Path, checkout: Path) -> dict:
    """$NANOCHAT_BASE_DIR with what nanochat's training reads before its first step."""
    vocab_size = write_tokenizer(home / "tokenizer", nanochat_special_tokens(checkout))
    files = write_documents(home / "base_data_climbmix")
    return {"vocab_size": vocab_size, "parquet_files": [file.name for file in files]}


# ---------------------------------------------------------------------- nanochat's run


def nanochat_arguments(config: RunConfig, steps: int, device: str) -> list[str]:
    """scripts/base_train.py's flags for config's shape: no evaluation, CORE, samples or W&B, only the steps."""
    return ["--depth", str(config.depth), "--max-seq-len", str(config.max_seq_len),
            "--device-batch-size", str(config.device_batch_size), "--total-batch-size", str(config.total_batch_size),
            "--num-iterations", str(steps), "--window-pattern", "L", "--eval-every", "-1",
            "--core-metric-every", "-1", "--sample-every", "-1", "--run", "dummy", "--device-type", device]


def parse_nanochat_log(lines: list[str], total_batch_size: int, warmup_steps: int) -> dict:
    """Tokens/s of nanochat's steps after the first warmup_steps (its own dt, each step synchronised), its
    FLOPs/token estimate, parameter count and peak memory, from its output."""
    step_ms = [float(match[3]) for match in map(STEP_LINE.match, lines) if match]
    timed = step_ms[warmup_steps:]
    flops = next((float(match[1]) for match in map(FLOPS_LINE.match, lines) if match), None)
    peak = next((float(match[1]) for match in map(PEAK_MEMORY_LINE.match, lines) if match), None)
    parameters = next((int(match[1].replace(",", "")) for match in map(PARAMETERS_LINE.match, lines) if match), None)
    return {"steps_logged": len(step_ms), "timed_steps": len(timed),
            "ms_per_step": sum(timed) / len(timed) if timed else None,
            "tok_per_sec": 1000 * len(timed) * total_batch_size / sum(timed) if timed else None,
            "flops_per_token": flops, "num_params": parameters,
            "peak_memory_gib": None if peak is None else peak / 1024}


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended as the time ran out
        os.killpg(pid, signal.SIGKILL)


def run_nanochat(checkout: Path, home: Path, config: RunConfig, steps: int, device: str, timeout_s: float,
                 log: Callable[[str], None]) -> dict:
    """nanochat's training as a process of its own (killed after timeout_s), its output passed to log."""
    command = [sys.executable, "-c", BOOTSTRAP, *nanochat_arguments(config, steps, device)]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(home), "NANOCHAT_DTYPE": "bfloat16", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    # In a process group of its own, so that its compile workers go with it; a stray byte that is not UTF-8 in its
    # output must not stop the reading
    process = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1, start_new_session=True)
    timer = threading.Timer(timeout_s, kill_group, (process.pid,))
    timer.start()
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        log(f"nanochat | {lines[-1]}")
    return_code = process.wait()
    timer.cancel()
    result = {"command": f"python -m scripts.base_train {' '.join(command[3:])}", "dtype": "bfloat16",
              "return_code": return_code, "wall_s": time.monotonic() - start,
              **parse_nanochat_log(lines, config.total_batch_size, NANOCHAT_WARMUP_STEPS)}
    if return_code != 0:
        result["error"] = " | ".join(line for line in lines[-5:] if line.strip())[-500:]
    return result


def checkout_commit(checkout: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # a copy without its .git


# ---------------------------------------------------------------------- the comparison


def ours(config: RunConfig, dtype: str, steps: int, warmup_steps: int, log: Callable[[str], None],
         **levers) -> dict:
    """Our train_step at config's shape in dtype, compiled (on CUDA), timed as the throughput benchmark times it;
    levers: RunConfig fields (train_throughput.SPEED_LEVERS). A measurement that fails is recorded with its error
    and no figures: the ones after it still run."""
    try:
        result = train_throughput.measure(dataclasses.replace(config, dtype=dtype, compile=True, **levers), steps,
                                          warmup_steps, log=log)
    except Exception as error:
        traceback.print_exc()
        result = {"dtype": dtype, **levers, "error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
                  **dict.fromkeys(("ms_per_step", "tok_per_sec", "mfu", "peak_memory_gib"))}
    torch.compiler.reset()  # drop the compiled graphs (and the model they hold) before the next measurement
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def ratio(report: dict, ours_key: str = "ours") -> float | None:
    """Our bf16 tokens/s (report[ours_key]) over nanochat's (above 1: we are faster)."""
    ours_rate = report.get(ours_key, {}).get("tok_per_sec")
    theirs = report.get("nanochat", {}).get("tok_per_sec")
    return ours_rate / theirs if ours_rate and theirs else None


def compare(checkout: Path, work_dir: Path, record: Callable[[dict], None], *, device: str = "cuda",
            config: RunConfig | None = None, nanochat_steps: int = NANOCHAT_STEPS, our_steps: int = OUR_STEPS,
            our_warmup_steps: int = OUR_WARMUP_STEPS, timeout_s: float = 600, t4_path: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """nanochat (given at most timeout_s), then ours in bf16 (with the defaults, then with all the speed levers),
    then, with t4_path, our T4 path; each result passed to record as soon as it is known."""
    config = dataclasses.replace(config or RunConfig(), device=device)
    report: dict = {"shape": shape(config), "dtype": "bfloat16", "nanochat_commit": checkout_commit(checkout)}

    def update(values: dict) -> None:
        report.update(values)
        report["ratio"], report["ratio_levers"] = ratio(report), ratio(report, "ours_levers")
        record(report)

    update({"nanochat_home": prepare_home(work_dir / "nanochat_home", checkout)})
    nanochat = run_nanochat(checkout, work_dir / "nanochat_home", config, nanochat_steps, device, timeout_s, log)
    peak = peak_flops(torch.cuda.get_device_name() if device == "cuda" else device, torch.bfloat16)
    nanochat["mfu"] = (None if nanochat["flops_per_token"] is None or nanochat["tok_per_sec"] is None else
                       mfu(nanochat["flops_per_token"], nanochat["tok_per_sec"], peak))
    update({"nanochat": nanochat})
    update({"ours": ours(config, "bfloat16", our_steps, our_warmup_steps, log)})
    update({"ours_levers": ours(config, "bfloat16", our_steps, our_warmup_steps, log,
                                **train_throughput.SPEED_LEVERS)})
    if t4_path:
        update({"ours_t4_path": ours(config, "float16", our_steps, our_warmup_steps, log)})
    return report


def main(argv: list[str] | None = None) -> dict:
    reference = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat", type=Path, required=True, help="an unmodified nanochat checkout")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vs_nanochat"),
                        help="nanochat's home (data, tokenizer, its checkpoint)")
    parser.add_argument("--depth", type=int, default=reference.depth)
    parser.add_argument("--seq-len", type=int, default=reference.max_seq_len)
    parser.add_argument("--device-batch-size", type=int, default=reference.device_batch_size)
    parser.add_argument("--total-batch-size", type=int, default=reference.total_batch_size)
    parser.add_argument("--nanochat-steps", type=int, default=NANOCHAT_STEPS,
                        help=f"nanochat's steps; the first {NANOCHAT_WARMUP_STEPS} are not timed")
    parser.add_argument("--steps", type=int, default=OUR_STEPS, help="our timed steps")
    args = parser.parse_args(argv)
    if not (args.nanochat / "scripts" / "base_train.py").is_file():
        parser.error(f"--nanochat {args.nanochat}: no scripts/base_train.py there (a nanochat checkout)")
    config = dataclasses.replace(reference, depth=args.depth, max_seq_len=args.seq_len,
                                 device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                                 eval_tokens=args.seq_len + 1).validate()

    def record(report: dict) -> None:
        if args.out:
            write_json(args.out, report)

    report = compare(args.nanochat, args.work_dir, record, device=args.device, config=config,
                     nanochat_steps=args.nanochat_steps, our_steps=args.steps,
                     log=lambda line: print(line, flush=True))
    print(json.dumps({key: report[key] for key in ("shape", "dtype", "ratio", "ratio_levers")}
                     | {name: report[name]["tok_per_sec"] for name in ("nanochat", "ours", "ours_levers",
                                                                       "ours_t4_path")}))
    return report


if __name__ == "__main__":
    main()
