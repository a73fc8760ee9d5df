"""The container image every v1 task runs in: the Dockerfile's image, described as an ImageSpec (its contents, which
Flyte 2's image shares, in workflows/presets.py).

`pyflyte run --remote` / `union run --remote` build IMAGE_SPEC themselves: Union's builder builds it remotely;
flytekit's default builder needs a local Docker and pushes to $NANOCHAT_IMAGE_REGISTRY (e.g. ghcr.io/you).

To run on a prebuilt image instead (`docker build` of the Dockerfile), set NANOCHAT_IMAGE to its URI.
pyflyte's `--image` flag cannot do this: it sets only the default image, and flytekit looks up a replacement
for a task's ImageSpec under the spec's content hash, never under its name (flytekit 1.16,
python_auto_container.get_registerable_container_image).
"""

import os

from flytekit import ImageSpec

from workflows.presets import (
    APT_PACKAGES,
    CUDA_IMAGE,
    FETCH_GPT2_RANKS,
    PROJECT_DEPENDENCIES,
    TIKTOKEN_CACHE_DIR,
    TORCH_VERSION,
)

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
