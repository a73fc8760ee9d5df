# The image every nanochat-flyte task runs in, for clusters that pull a prebuilt image
# (workflows/image.py describes the same image as an ImageSpec for `pyflyte run --remote` to build).
#
#   docker build -t ghcr.io/you/nanochat-flyte:0.1.0 . && docker push ghcr.io/you/nanochat-flyte:0.1.0
#   NANOCHAT_IMAGE=ghcr.io/you/nanochat-flyte:0.1.0 pyflyte run --remote workflows/nanochat.py main ...
#
# For the Flyte 2 front, add its SDK (the package's flyte2 extra) and name the image with NANOCHAT_FLYTE2_IMAGE:
#
#   docker build --build-arg EXTRAS="[flyte2]" -t ghcr.io/you/nanochat-flyte2:0.1.0 . && docker push ...
#   NANOCHAT_FLYTE2_IMAGE=ghcr.io/you/nanochat-flyte2:0.1.0 flyte run workflows/flyte2/nanochat.py main ...
#
# torch 2.10.0's default PyPI wheel is built against CUDA 12.8 and ships kernels for Turing (sm_75, the T4)
# through Blackwell; torch 2.11+ moved the default wheel to CUDA 13, which needs a newer driver (>= 580) than
# many T4 node images have. The wheel brings its own cuBLAS/cuDNN/NCCL as pip packages, so the CUDA "base"
# image (driver hooks and cudart only) is enough: "cudnn-runtime" would carry a second copy of ~3 GB.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
ARG TORCH_VERSION=2.10.0
ARG EXTRAS=""

# ---------------------------------------------------------------- build: Python 3.11 and every wheel
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION
ARG EXTRAS
# Ubuntu 22.04 ships Python 3.10; uv installs a standalone 3.11 (headers included, which Triton needs).
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv venv --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# Every dependency is a binary wheel for CPython 3.11 on manylinux x86_64: no compiler in this stage either.
WORKDIR /src
COPY pyproject.toml ./
COPY nanochat_flyte ./nanochat_flyte
RUN uv pip install "torch==${TORCH_VERSION}" ".${EXTRAS}"

# GPT-2's ranks (tiktoken "r50k_base"), fetched once here so that tasks never download them.
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
RUN python -c 'import tiktoken; tiktoken.get_encoding("r50k_base")' && test -n "$(ls /opt/tiktoken)"

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}
# git: W&B records the code version with it (the reference run's first attempt failed without it).
# gcc + libc headers: torch.compile's Triton kernels build a small C launcher at run time.
# ca-certificates: https for git and the data downloads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tiktoken /opt/tiktoken

# Flyte's fast registration unpacks the code into the working directory and imports it from there, so it
# shadows the copies below; the copies make the image usable without fast registration (--copy none).
WORKDIR /root
COPY workflows ./workflows
COPY configs ./configs

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/root \
    PYTHONUNBUFFERED=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken
