"""Supervised fine-tuning (SFT): a base checkpoint becomes a chat checkpoint, trained on conversations.

examples:
  nanochat sft --base-checkpoint runs/base --out-dir runs/chat --config configs/chat_smoke.yaml
  torchrun --nproc_per_node=8 -m nanochat_flyte sft --base-checkpoint s3://bucket/base --out-dir runs/chat

The datasets come from $HF_ENDPOINT (default: the Hugging Face hub), prepared once per node into a cache folder,
unless --data-dir names prepared data.
"""

from nanochat_flyte.cli.chat_stage import run_stage, stage_arguments
from nanochat_flyte.config import ChatConfig
from nanochat_flyte.data.chat_data import prepare_sft_data
from nanochat_flyte.pipeline.setup import sft_start
from nanochat_flyte.training.sft import train_chat


def main(argv: list[str] | None = None) -> dict:
    chat, args = stage_arguments("sft", __doc__, ChatConfig, "--base-checkpoint", "a base checkpoint", argv)
    return run_stage(chat, args.base_checkpoint, args, sft_start, prepare_sft_data, train_chat)
