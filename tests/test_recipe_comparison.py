"""bench/recipe_comparison.py: every variant trains at every seed on one shared data directory, the table compares
means against the first variant, and a finished run of the same config is read instead of trained again."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_bench

from tests.shard_server import write_fineweb_shards

comparison = load_bench("recipe_comparison")
TINY = ["--set", "depth=1", "--set", "max_seq_len=32", "--set", "device_batch_size=4", "--set", "total_batch_size=128",
        "--set", "num_iterations=2", "--set", "eval_every=2", "--set", "eval_tokens=64", "--set", "bpe_vocab_size=300"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_fineweb_shards(directory, [0, 1, 1822], docs_per_shard=40)
    return directory


def test_variants_at_every_seed_against_the_first(corpus, tmp_path, capsys):
    argv = ["--corpus", str(corpus), "--out", str(tmp_path), "--seeds", "1,2", "--variant", "reference",
            "--variant", "scalars residual_scalars=true scalar_lr=0.3", *TINY]
    results = comparison.main(argv)
    out = capsys.readouterr().out
    assert {path.name for path in tmp_path.iterdir()} >= {"data", "reference_s1", "reference_s2", "scalars_s1",
                                                          "scalars_s2"}
    reference, scalars = results["reference"], results["scalars"]
    assert reference["bpb"][1] != reference["bpb"][2]  # seeds change the initial weights
    assert reference["delta"] == 0.0
    assert scalars["delta"] == pytest.approx((sum(scalars["bpb"].values()) - sum(reference["bpb"].values())) / 2)
    assert f"| scalars | {scalars['bpb'][1]:.4f} | {scalars['bpb'][2]:.4f} | {scalars['mean']:.4f} | " \
           f"{scalars['delta']:+.4f} |" in out
    assert '"residual_scalars": true' in (tmp_path / "scalars_s1" / "config.json").read_text()

    checkpoint = tmp_path / "scalars_s1" / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    assert comparison.main(argv) == results  # read back, not trained again
    assert checkpoint.stat().st_mtime_ns == written
    changed = comparison.main([*argv, "--set", "num_iterations=3"])  # another config: trained again
    assert checkpoint.stat().st_mtime_ns != written and changed != results


def test_variants_that_would_need_different_data_are_refused(corpus, tmp_path):
    with pytest.raises(SystemExit, match="differ in bpe_vocab_size"):
        comparison.main(["--corpus", str(corpus), "--out", str(tmp_path), "--variant", "reference",
                         "--variant", "other bpe_vocab_size=400", *TINY])
    assert not (tmp_path / "data").exists()


def test_a_misspelt_field_is_one_line_before_any_work(corpus, tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "recipe_comparison.py"
    result = subprocess.run([sys.executable, str(script), "--corpus", str(corpus), "--out", str(tmp_path),
                             "--variant", "reference", "--variant", "typo warmdown_ration=0.4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: RunConfig.warmdown_ration: unknown field; did you mean warmdown_ratio?"]
    assert not (tmp_path / "data").exists()
