"""Supervised fine-tuning (SFT): a base checkpoint becomes a chat checkpoint, trained on conversations.

examples:
  nanochat sft --base-checkpoint runs/base --out-dir runs/chat --config configs/chat_smoke.yaml
  torchrun --nproc_per_node=8 -m nanochat_flyte sft --base-checkpoint s3://bucket/base --out-dir runs/chat

The datasets come from $HF_ENDPOINT (default: the Hugging Face hub), prepared once per node into a cache folder,
unless --data-dir names prepared data.
"""

from pathlib import Path

from nanochat_flyte.cli.chat_stage import SFT_DATA_KEYS, data_cache_dir, run_stage
from nanochat_flyte.cli.usage import ArgumentParser
from nanochat_flyte.config import ChatConfig, load_config
from nanochat_flyte.data.chat_data import prepare_sft_data
from nanochat_flyte.schema import parse_override
from nanochat_flyte.training.sft import train_chat


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser("sft", __doc__)
    parser.add_argument("--base-checkpoint", required=True, help="a base checkpoint directory or fsspec URI")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the chat checkpoint directory is written")
    parser.add_argument("--config", help="a ChatConfig preset (YAML or JSON), e.g. configs/chat_smoke.yaml")
    parser.add_argument("--data-dir", type=Path, help="prepared SFT data (default: prepared from $HF_ENDPOINT into "
                                                      "a cache folder)")
    parser.add_argument("--resume-dir", type=Path, help="a chat checkpoint directory to continue from")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args(argv)
    chat = load_config(args.config, ChatConfig,
                       **dict(parse_override(item, "ChatConfig") for item in args.overrides)).validate()
    return run_stage(chat, args.base_checkpoint, args, data_cache_dir("sft_data", chat, SFT_DATA_KEYS),
                     prepare_sft_data, train_chat)


