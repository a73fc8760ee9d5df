"""bench/vs_nanochat.py on a CPU: reading nanochat's output (a sample captured from its own training), the data and
tokenizer made for it, and the whole comparison against a stand-in checkout whose training prints nanochat's lines,
with our side's tiny CPU run. nanochat itself and the GPU figures are docs/gpu_acceptance.md's business."""

import dataclasses
import json
import os
import pickle
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import load_bench, tiny_config

from nanochat_flyte.data.tokenizer import gpt2_tokenizer

vs_nanochat = load_bench("vs_nanochat")

# nanochat's output (commit 92d63d4, depth 2, context 64, on a CPU): the lines the comparison reads, among others
CAPTURED_LOG = """\
total                   : 19,709,994
Estimated FLOPs per token: 4.118959e+07
Total batch size 256 => gradient accumulation steps: 2
step 00000/00007 (0.00%) | loss: 10.826529 | lrm: 0.03 | dt: 159743.22ms | tok/sec: 1 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 3 | total time: 0.00m
step 00001/00007 (14.29%) | loss: 10.825238 | lrm: 0.05 | dt: 2062.27ms | tok/sec: 124 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 3 | total time: 0.00m
step 00002/00007 (28.57%) | loss: 10.824335 | lrm: 0.07 | dt: 1802.23ms | tok/sec: 142 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 3 | total time: 0.00m
step 00003/00007 (42.86%) | loss: 10.822926 | lrm: 0.10 | dt: 1722.17ms | tok/sec: 148 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 3 | total time: 0.00m
step 00004/00007 (57.14%) | loss: 10.821253 | lrm: 0.12 | dt: 1985.87ms | tok/sec: 128 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 3 | total time: 0.00m
step 00005/00007 (71.43%) | loss: 10.819191 | lrm: 0.15 | dt: 2038.23ms | tok/sec: 125 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 4 | total time: 0.00m
step 00006/00007 (85.71%) | loss: 10.816319 | lrm: 0.17 | dt: 1762.98ms | tok/sec: 145 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 4 | total time: 0.00m
Peak memory usage: 2048.00MiB
Total training time: 0.00m
"""  # noqa: E501


def test_nanochat_tokens_per_second_come_from_its_steps_after_the_warm_up():
    parsed = vs_nanochat.parse_nanochat_log(CAPTURED_LOG.splitlines(), total_batch_size=256, warmup_steps=5)
    assert parsed["steps_logged"] == 7 and parsed["timed_steps"] == 2
    assert parsed["ms_per_step"] == pytest.approx((2038.23 + 1762.98) / 2)
    assert parsed["tok_per_sec"] == pytest.approx(2 * 256 / (2.03823 + 1.76298))  # its own dt, not its rounded tok/sec
    assert parsed["flops_per_token"] == 4.118959e07 and parsed["peak_memory_gib"] == 2.0
    assert parsed["num_params"] == 19_709_994  # its model's own count: more than ours at the same depth
    crashed = vs_nanochat.parse_nanochat_log(CAPTURED_LOG.splitlines()[:6], total_batch_size=256, warmup_steps=5)
    assert crashed["timed_steps"] == 0 and crashed["tok_per_sec"] is None and crashed["peak_memory_gib"] is None


def stand_in_checkout(path: Path, train_script: str) -> Path:
    """A folder laid out as a nanochat checkout: its tokenizer module's special tokens and a training script."""
    (path / "nanochat").mkdir(parents=True)
    (path / "nanochat" / "tokenizer.py").write_text('import os\nSPECIAL_TOKENS = [\n    "<|bos|>",  # documents\n'
                                                   '    "<|user_start|>",\n]\nPATTERN = "x"\n')
    (path / "scripts").mkdir()
    (path / "scripts" / "base_train.py").write_text(textwrap.dedent(train_script))
    return path


def test_nanochat_gets_its_tokenizer_and_documents_in_its_own_formats(tmp_path):
    checkout = stand_in_checkout(tmp_path / "nanochat", "")
    assert vs_nanochat.nanochat_special_tokens(checkout) == ["<|bos|>", "<|user_start|>"]
    home = tmp_path / "home"
    assert vs_nanochat.prepare_home(home, checkout) == {"vocab_size": 50258,
                                                        "parquet_files": ["shard_00000.parquet", "shard_00001.parquet"]}

    encoding = pickle.loads((home / "tokenizer" / "tokenizer.pkl").read_bytes())
    gpt2 = gpt2_tokenizer()
    assert encoding.n_vocab == 50258 and encoding.encode_single_token("<|bos|>") == 50256
    assert encoding.encode_ordinary("The cat sees a small boat.") == gpt2.encode_ordinary("The cat sees a small boat.")
    token_bytes = torch.load(home / "tokenizer" / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and len(token_bytes) == 50258
    assert token_bytes[50256:].tolist() == [0, 0] and token_bytes[gpt2.encode_single_token(" cat")] == 4

    train, val = (pq.ParquetFile(home / "base_data_climbmix" / name) for name in ("shard_00000.parquet",
                                                                                 "shard_00001.parquet"))
    assert train.metadata.num_rows == vs_nanochat.TRAIN_DOCUMENTS and val.metadata.num_rows == vs_nanochat.VAL_DOCUMENTS
    assert train.num_row_groups > 1  # nanochat's loader reads a row group at a time
    documents = train.read_row_group(0).column("text").to_pylist()
    lengths = sorted(len(gpt2.encode_ordinary(document)) for document in documents)
    assert 300 < lengths[len(lengths) // 2] < 1500  # a few hundred tokens, as web pages


STAND_IN_TRAINING = """\
    import json, os, sys
    import rustbpe, wandb  # imported by nanochat's training whether or not it uses them
    home = os.environ["NANOCHAT_BASE_DIR"]
    received = {"argv": sys.argv[1:], "cwd": os.getcwd(), "dtype": os.environ["NANOCHAT_DTYPE"],
                "parquet": sorted(os.listdir(os.path.join(home, "base_data_climbmix"))),
                "stand_ins": [not hasattr(module, "__file__") for module in (rustbpe, wandb)]}
    json.dump(received, open(os.path.join(home, "received.json"), "w"))
    print("Estimated FLOPs per token: 1.000000e+06")
    steps = int(sys.argv[sys.argv.index("--num-iterations") + 1])
    for step in range(steps):
        print(f"step {step:05d}/{steps:05d} (0.00%) | loss: 10.0 | lrm: 1.00 | dt: {100.0 * (1 + step % 2):.2f}ms | "
              f"tok/sec: 1,280 | bf16_mfu: 0.00 | epoch: 1 | total time: 0.00m", flush=True)
    print("Peak memory usage: 512.00MiB")
"""


@pytest.fixture(scope="module")
def tiny_reference():
    return dataclasses.replace(tiny_config(), device_batch_size=2, total_batch_size=128)


def test_the_comparison_runs_nanochat_as_a_checkout_then_ours_on_a_cpu(tmp_path, tiny_reference, monkeypatch):
    checkout = stand_in_checkout(tmp_path / "nanochat", STAND_IN_TRAINING)
    # nanochat's process, as on the GPU machine: wandb and rustbpe are not installed, so importing either fails
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        'import sys\nsys.modules["wandb"] = sys.modules["rustbpe"] = None\n')
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    records, lines = [], []
    report = vs_nanochat.compare(checkout, tmp_path / "work", lambda r: records.append(json.loads(json.dumps(r))),
                                 device="cpu", config=tiny_reference, nanochat_steps=7, our_steps=1,
                                 our_warmup_steps=1, log=lines.append)
    received = json.loads((tmp_path / "work" / "nanochat_home" / "received.json").read_text())
    assert received["cwd"] == str(checkout) and received["dtype"] == "bfloat16"
    assert received["parquet"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert received["stand_ins"] == [True, True]
    assert received["argv"] == ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2",
                                "--total-batch-size", "128", "--num-iterations", "7", "--window-pattern", "L",
                                "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
                                "--run", "dummy", "--device-type", "cpu"]
    assert "nanochat | Peak memory usage: 512.00MiB" in lines

    nanochat, ours, levers, t4_path = report["nanochat"], report["ours"], report["ours_levers"], report["ours_t4_path"]
    assert nanochat["return_code"] == 0 and nanochat["timed_steps"] == 2  # steps 5 and 6: 200 and 100 ms
    assert nanochat["tok_per_sec"] == pytest.approx(2 * 128 / 0.3) and nanochat["peak_memory_gib"] == 0.5
    assert nanochat["mfu"] is None  # a CPU has no known peak
    assert (ours["dtype"], t4_path["dtype"]) == ("bfloat16", "float16") and ours["depth"] == t4_path["depth"] == 1
    assert report["ratio"] == pytest.approx(ours["tok_per_sec"] / nanochat["tok_per_sec"])
    assert (levers["dtype"], levers["muon_batched"], levers["loss_chunk_tokens"]) == ("bfloat16", True, 2048)
    assert report["ratio_levers"] == pytest.approx(levers["tok_per_sec"] / nanochat["tok_per_sec"])
    assert report["shape"] == {"depth": 1, "seq_len": 32, "device_batch_size": 2, "total_batch_size": 128}
    assert report["dtype"] == "bfloat16" and report["nanochat_commit"] is None  # a folder without .git
    # recorded as it went: the home, then nanochat, then each of ours, the ratio once both sides are in
    assert [sorted(set(r) & {"nanochat", "ours", "ours_levers", "ours_t4_path"}) for r in records] == [
        [], ["nanochat"], ["nanochat", "ours"], ["nanochat", "ours", "ours_levers"],
        ["nanochat", "ours", "ours_levers", "ours_t4_path"]]
    assert [r["ratio"] is None for r in records] == [True, True, False, False, False]
    assert [r["ratio_levers"] is None for r in records] == [True, True, True, False, False]


def test_a_measurement_of_ours_that_fails_is_recorded_and_the_next_still_runs(tiny_reference, monkeypatch):
    def broken(config, *args, **kwargs):
        raise RuntimeError("CUDA graphs: an input was overwritten\nmore detail")

    monkeypatch.setattr(vs_nanochat.train_throughput, "measure", broken)
    result = vs_nanochat.ours(tiny_reference, "bfloat16", 1, 1, lambda line: None, muon_batched=True)
    assert result["error"] == "RuntimeError: CUDA graphs: an input was overwritten"
    assert (result["dtype"], result["muon_batched"], result["tok_per_sec"]) == ("bfloat16", True, None)


def test_a_nanochat_that_fails_leaves_its_last_words_and_no_ratio(tmp_path, tiny_reference):
    checkout = stand_in_checkout(tmp_path / "nanochat", "raise SystemExit('no CUDA device here')\n")
    report = vs_nanochat.compare(checkout, tmp_path / "work", lambda report: None, device="cpu",
                                 config=tiny_reference, nanochat_steps=7, our_steps=1, our_warmup_steps=1,
                                 t4_path=False, log=lambda line: None)
    assert report["nanochat"]["return_code"] == 1 and report["nanochat"]["error"] == "no CUDA device here"
    assert report["nanochat"]["tok_per_sec"] is None and report["ratio"] is None
    assert report["ours"]["tok_per_sec"] > 0  # our side is measured all the same
    assert "ours_t4_path" not in report  # (the acceptance's throughput section measures it when it runs too)


def test_a_nanochat_past_its_time_is_stopped_with_the_processes_it_started(tmp_path, tiny_reference):
    """Its compile workers hold its output pipe too: the reading ends only when they are gone as well."""
    checkout = stand_in_checkout(tmp_path / "nanochat", """\
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("step 00000/00007 (0.00%) | loss: 10.8 | lrm: 0.03 | dt: 9.0ms | tok/sec: 1 | total time: 0.00m",
              flush=True)
        sys.stdout.buffer.write(b"a byte that is not UTF-8: \\xff\\n")
        sys.stdout.flush()
        time.sleep(600)
        """)
    (tmp_path / "home").mkdir()
    result = vs_nanochat.run_nanochat(checkout, tmp_path / "home", tiny_reference, steps=7, device="cpu",
                                      timeout_s=10, log=lambda line: None)
    assert result["wall_s"] < 60 and result["return_code"] == -9
    assert result["steps_logged"] == 1 and result["tok_per_sec"] is None
