"""Reinforcement learning (RL) on GSM8K: a chat checkpoint learns from its own answers, rewarded for the right number.

examples:
  nanochat rl --sft-checkpoint runs/chat --out-dir runs/rl --config configs/rl_smoke.yaml
  torchrun --nproc_per_node=8 -m nanochat_flyte rl --sft-checkpoint s3://bucket/chat --out-dir runs/rl

The problems come from $HF_ENDPOINT (default: the Hugging Face hub), prepared once per node into a cache folder,
unless --data-dir names prepared problems.
"""

from pathlib import Path

from nanochat_flyte.cli.chat_stage import RL_DATA_KEYS, data_cache_dir, run_stage
from nanochat_flyte.cli.usage import ArgumentParser
from nanochat_flyte.config import RLConfig, load_config
from nanochat_flyte.data.chat_data import prepare_rl_data
from nanochat_flyte.schema import parse_override
from nanochat_flyte.training.rl import check_sft_checkpoint, train_rl


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser("rl", __doc__)
    parser.add_argument("--sft-checkpoint", required=True, help="a chat (SFT) checkpoint directory or fsspec URI")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the RL checkpoint directory is written")
    parser.add_argument("--config", help="an RLConfig preset (YAML or JSON), e.g. configs/rl_smoke.yaml")
    parser.add_argument("--data-dir", type=Path, help="prepared RL problems (default: prepared from $HF_ENDPOINT "
                                                      "into a cache folder)")
    parser.add_argument("--resume-dir", type=Path, help="an RL checkpoint directory to continue from")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    rl = load_config(args.config, RLConfig,
                     **dict(parse_override(item, "RLConfig") for item in args.overrides)).validate()
    check_sft_checkpoint(args.sft_checkpoint)  # before any download
    return run_stage(rl, args.sft_checkpoint, args, data_cache_dir("rl_data", rl, RL_DATA_KEYS), prepare_rl_data,
                     train_rl)
