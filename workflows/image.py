"""The container image every task runs in: the Dockerfile's image, described as an ImageSpec.

`pyflyte run --remote` / `union run --remote` build IMAGE_SPEC themselves: Union's builder builds it remotely;
flytekit's default builder needs a local Docker and pushes to $NANOCHAT_IMAGE_REGISTRY (e.g. ghcr.io/you).

To run on a prebuilt image instead (`docker build` of the Dockerfile), set NANOCHAT_IMAGE to its URI.
pyflyte's `--image` flag cannot do this: it sets only the default image, and flytekit looks up a replacement
for a task's ImageSpec under the spec's content hash, never under its name (flytekit 1.16,
python_auto_container.get_registerable_container_image).
"""

import os

from flytekit import ImageSpec

CUDA_IMAGE = "nvidia/cuda:12.8.1-base-ubuntu22.04"  # the Dockerfile's CUDA_IMAGE
TORCH_VERSION = "2.10.0"  # the Dockerfile's TORCH_VERSION: CUDA 12.8 wheel with T4 (sm_75) kernels
TIKTOKEN_CACHE_DIR = "/opt/tiktoken"  # GPT-2's ranks, fetched at build time
# git for W&B's code version; gcc + libc headers because torch.compile's Triton builds C at run time
APT_PACKAGES = ["git", "gcc", "libc6-dev", "ca-certificates"]
FETCH_GPT2_RANKS = "python -c 'import tiktoken; tiktoken.get_encoding(\"r50k_base\")'"  # into TIKTOKEN_CACHE_DIR

# pyproject.toml's [project.dependencies]; tests/test_dockerfile.py fails when the two drift apart.
PROJECT_DEPENDENCIES = [
    "torch>=2.5", "numpy>=1.26", "tiktoken>=0.7", "pyarrow>=15", "requests>=2.31", "fsspec>=2024.3", "pyyaml>=6",
    "wandb>=0.31", "matplotlib>=3.8", "rustbpe>=0.1", "flytekit>=1.16,<1.17",
    "flytekitplugins-kfpytorch>=1.16,<1.17", "fastapi>=0.110", "uvicorn>=0.29",
]

IMAGE_SPEC = ImageSpec(
    name="nanochat-flyte",
    registry=os.environ.get("NANOCHAT_IMAGE_REGISTRY") or None,
    base_image=CUDA_IMAGE,
    python_version="3.11",
    apt_packages=APT_PACKAGES,
    packages=[f"torch=={TORCH_VERSION}", *PROJECT_DEPENDENCIES],
    env={"TIKTOKEN_CACHE_DIR": TIKTOKEN_CACHE_DIR},
    commands=[FETCH_GPT2_RANKS],
    # The presets, at /root/configs beside the code fast registration unpacks into /root: `--copy auto` ships the
    # Python modules only, and workflows/presets.py reads these when a task's container imports it (every task
    # does, through support.py).
    # (A path from where pyflyte runs: the repository root.)
    copy=["configs"],
)

IMAGE = os.environ.get("NANOCHAT_IMAGE") or IMAGE_SPEC
