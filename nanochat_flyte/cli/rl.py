"""Reinforcement learning (RL) on GSM8K: a chat checkpoint learns from its own answers, rewarded for the right number.

examples:
  nanochat rl --sft-checkpoint runs/chat --out-dir runs/rl --config configs/rl_smoke.yaml
  torchrun --nproc_per_node=8 -m nanochat_flyte rl --sft-checkpoint s3://bucket/chat --out-dir runs/rl

The problems come from $HF_ENDPOINT (default: the Hugging Face hub), prepared once per node into a cache folder,
unless --data-dir names prepared problems.
"""

from nanochat_flyte.cli.chat_stage import run_stage, stage_arguments
from nanochat_flyte.config import RLConfig
from nanochat_flyte.data.chat_data import prepare_rl_data
from nanochat_flyte.pipeline.setup import rl_start
from nanochat_flyte.training.rl import train_rl


def main(argv: list[str] | None = None) -> dict:
    rl, args = stage_arguments("rl", __doc__, RLConfig, "--sft-checkpoint", "a chat (SFT) checkpoint", argv)
    return run_stage(rl, args.sft_checkpoint, args, rl_start, prepare_rl_data, train_rl)
