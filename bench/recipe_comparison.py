"""Does a recipe change help? Train one small model on real prose under several recipes; compare validation bpb.

    python scripts/build_doc_corpus.py --out /tmp/doc_corpus      # Debian's Perl and PostgreSQL manuals
    python bench/recipe_comparison.py --corpus /tmp/doc_corpus --out /tmp/recipe --seeds 42,43 \
        --variant reference \
        --variant "tuned warmdown_ratio=0.4 residual_scalars=true scalar_lr=0.2"

A variant is a name and RunConfig overrides on top of PROXY, a depth-4 model that a 2-core CPU trains for 300 steps
in about 15 minutes. The first variant is the baseline: the table gives each variant's final validation bpb per
seed, its mean, and its difference from the baseline's mean (negative is better). Seeds change the initial weights,
so the spread between seeds is the noise a difference has to beat. A run whose directory already holds a finished
run of the same config is read, not trained again: an interrupted comparison goes on where it stopped.

This is a proxy: nanochat's own sweeps show that gains shrink (or flip) with scale, so a recipe for the reference
run is only settled by a run at the reference shape. What the proxy can show is direction, on real text, cheaply.
"""

import argparse
import json
import shutil
import statistics
from pathlib import Path

from nanochat_flyte.config import RunConfig
from nanochat_flyte.data.prepare import prepare_data
from nanochat_flyte.schema import parse_override
from nanochat_flyte.training.pretrain import train

# Small enough for a CPU, real enough to learn from: our BPE at 8,192 tokens (GPT-2's 50,257-row head would be
# most of a depth-4 model's compute), context 256, 4,096 tokens a step. 300 steps read 1.2M tokens: 0.66 epoch of
# the Debian-manuals corpus (1.87M tokens), so no text is seen twice. Validation bpb on 128K held-out tokens.
PROXY = dict(num_shards=2, tokenizer="bpe", bpe_vocab_size=8192, depth=4, max_seq_len=256, device_batch_size=8,
             total_batch_size=4096, num_iterations=300, eval_every=50, eval_tokens=131_072, sample_every=1000,
             save_every=1000, device="cpu", compile=False, wandb_mode="disabled", evaluate_core=False,
             eval_bundle_url="")
# The variants share one data directory, so they must agree on what goes into it.
DATA_FIELDS = ("data_url", "num_shards", "val_shard", "only_needed_shards", "tokenizer", "bpe_vocab_size",
               "bpe_train_chars")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name field=value ...' -> (name, overrides)."""
    name, *assignments = text.split()
    return name, dict(parse_override(assignment, RunConfig) for assignment in assignments)


def variant_config(corpus: str, seed: int, overrides: dict, common: dict) -> RunConfig:
    return RunConfig.from_mapping(PROXY | {"data_url": corpus, "seed": seed} | common | overrides).validate()


def saved_run(out_dir: Path, config: RunConfig) -> dict | None:
    """The summary of the run of this very config saved in out_dir (finished or not), if there is one."""
    try:
        summary = json.loads((out_dir / "training_state.json").read_text())
        saved = RunConfig().to_dict() | json.loads((out_dir / "config.json").read_text())  # older: defaults
    except (OSError, ValueError):
        return None
    # run_name is filled in per run, so it differs between otherwise identical runs
    same = all(saved.get(key) == value for key, value in config.to_dict().items() if key != "run_name")
    return summary if same else None


def run(config: RunConfig, data_dir: Path, run_dir: Path) -> dict:
    """The summary of this config's run in run_dir: read back when it finished, continued when it was stopped,
    trained anew (the folder is this benchmark's own) when it holds another config's run or none."""
    saved = saved_run(run_dir, config)
    if saved and saved.get("status") == "completed":
        return saved
    if saved is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return train(config, data_dir, run_dir, resume_dir=run_dir if saved else None)


def compare(corpus: str, out: Path, variants: list[tuple[str, dict]], seeds: list[int], common: dict) -> dict:
    """Train (or reuse) every variant at every seed; return {variant: {"bpb": {seed: bpb}, "mean", "delta"}}."""
    configs = {(name, seed): variant_config(corpus, seed, overrides, common)
               for name, overrides in variants for seed in seeds}  # every override checked before any work
    for field in DATA_FIELDS:
        if len({getattr(config, field) for config in configs.values()}) > 1:
            raise SystemExit(f"recipe_comparison: the variants differ in {field}; they must share their data")
    data_dir = out / "data"
    if not (data_dir / "manifest.json").exists():
        prepare_data(next(iter(configs.values())), data_dir, out / "cache")
    results = {}
    for (name, seed), config in configs.items():
        run_dir = out / f"{name}_s{seed}"
        summary = run(config, data_dir, run_dir)
        results.setdefault(name, {"bpb": {}})["bpb"][seed] = summary["final_validation_bpb"]
        print(f"recipe: {name} seed {seed}: final validation bpb {summary['final_validation_bpb']:.4f}", flush=True)
    baseline = None
    for name, result in results.items():
        result["mean"] = statistics.fmean(result["bpb"].values())
        baseline = result["mean"] if baseline is None else baseline
        result["delta"] = result["mean"] - baseline
    return results


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| variant | " + " | ".join(f"bpb seed {seed}" for seed in seeds) + " | mean | vs baseline |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for name, result in results.items():
        cells = [f"{result['bpb'][seed]:.4f}" for seed in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['mean']:.4f} | {result['delta']:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="shards in FineWeb-Edu's format (scripts/build_doc_corpus.py)")
    parser.add_argument("--out", type=Path, required=True, help="where the data and each run's directory go")
    parser.add_argument("--variant", action="append", required=True, metavar='"NAME [field=value ...]"',
                        help="repeat for each recipe; the first is the baseline")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds, each variant runs once per seed")
    parser.add_argument("--set", action="append", default=[], metavar="field=value",
                        help="an override for every variant, e.g. --set num_iterations=20")
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.variant]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    common = dict(parse_override(assignment, RunConfig) for assignment in args.set)
    results = compare(args.corpus, args.out, variants, seeds, common)
    print(table(results, seeds))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    from nanochat_flyte.cli.usage import run

    run(main)  # a misspelt field or value is one line, before any data is prepared
