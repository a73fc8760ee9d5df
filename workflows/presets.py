"""What both Flyte fronts declare alike, read at registration time: the presets they launch by name, the machines
their tasks ask for, what their image holds, and the nightly schedule.

Settings: NANOCHAT_NIGHTLY_CRON (default "0 3 * * *", UTC) and NANOCHAT_ALERT_EMAILS (comma-separated; empty: no
e-mail, failures show in the console only).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from croniter import croniter

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.errors import ConfigError
from nanochat_flyte.pipeline import secrets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCE_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4.yaml")  # the reference run
TUNED_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4_tuned.yaml")  # with later nanochat recipe changes
REFERENCE_CHAT_CONFIG = ChatConfig.from_file(CONFIGS / "chat_d8_t4.yaml")
REFERENCE_RL_CONFIG = RLConfig.from_file(CONFIGS / "rl_d8_t4.yaml")
# Depth 12 for ~3.2B tokens (20 per parameter, Chinchilla), bf16 on an A100: see the preset's comments.
D12_CONFIG = RunConfig.from_file(CONFIGS / "d12_a100.yaml")

# What the workflow files read from the environment to declare a task: its image, its secrets' names and its W&B
# console link. A task's pod imports its file again, to run the task and, in a Flyte 2 driver, to declare the tasks
# it starts, without the environment of the shell that registered it; so every task carries the values set there
# (v1's `environment=`, Flyte 2's `env_vars=`), and its pod declares, and looks up, what was registered.
REGISTERED_SETTINGS = {name: os.environ[name] for name in (
    "NANOCHAT_IMAGE", "NANOCHAT_FLYTE2_IMAGE", "NANOCHAT_IMAGE_REGISTRY", "NANOCHAT_WANDB_ENTITY",
    "NANOCHAT_WANDB_PROJECT", "NANOCHAT_WANDB_HOST", *(name for secret in secrets.ALL for name in secret.settings))
    if os.environ.get(name)}

NIGHTLY_CRON = os.environ.get("NANOCHAT_NIGHTLY_CRON", "0 3 * * *")
if not croniter.is_valid(NIGHTLY_CRON):  # (a Flyte 2 trigger's would reach the server as it is)
    raise ConfigError("NANOCHAT_NIGHTLY_CRON", f"not a cron expression: {NIGHTLY_CRON!r}", "environment")
ALERT_EMAILS = [address.strip() for address in os.environ.get("NANOCHAT_ALERT_EMAILS", "").split(",")
                if address.strip()]


@dataclass(frozen=True)
class Machine:
    """What a task asks for, as both fronts declare it (workflows/support.py's task_resources, workflows/flyte2/
    environments.py's node). A GPU node's requests equal its limits (a Guaranteed pod is the last evicted) and it
    gets a /dev/shm as large as allowed (a container's default is 64 MB; torch multiprocessing and NCCL use it)."""

    cpu: int
    memory: str
    disk: str
    gpu: str = ""  # the accelerator, as both SDKs name it
    gpus: int = 0


# The reference run's: one T4 with 8 CPUs and 32 GiB. Disk: ~6 GB of tokens for 50 shards, ~1 GB per checkpoint (kept
# twice: ours and Flyte's copy) and torch.compile's cache; 50Gi fits a 100 GB node disk.
T4_NODE = Machine(cpu=8, memory="32Gi", disk="50Gi", gpu="T4", gpus=1)
# The small CPU tasks that check inputs, write the results and (Flyte 2) chain the stages: they import torch and draw
# the report card's plots.
DRIVER_NODE = Machine(cpu=1, memory="4Gi", disk="10Gi")
# The data tasks: converting the whole SmolTalk split (460K rows) peaked at 2.9 GB of memory, and its parquet files and
# conversations take ~3 GB of disk.
DATA_NODE = Machine(cpu=4, memory="8Gi", disk="20Gi")
# a2-highgpu-1g has 12 vCPUs and 85 GB: the kubelet keeps its share. Disk as the T4's, plus bigger checkpoints.
A100_NODE = Machine(cpu=10, memory="64Gi", disk="60Gi", gpu="A100", gpus=1)
# One full A100 node (a2-highgpu-8g on GCP, p4d.24xlarge on AWS). Each rank downloads its own copy of the data
# directory (~7 GB), hence the disk.
EIGHT_A100_NODE = Machine(cpu=48, memory="256Gi", disk="150Gi", gpu="A100", gpus=8)

# ----------------------------------------------------------------------------- the image (the Dockerfile's)

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
