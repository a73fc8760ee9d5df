"""Where the Flyte 2 tasks run: the image, the secrets, the machines and the caches, as environments.

    nanochat       the driver tasks (`main`, the chat pipelines): a small CPU pod that checks the inputs, chains the
                   stages and writes the results; v1's workflows and their check and aggregate tasks
    nanochat_data  CPU data preparation, cached: v1's prepare_* and collect_data tasks
    nanochat_gpu   one T4 with 8 CPUs and 32 GiB, interruptible: v1's describe_training_node, training and
                   evaluation tasks

The image is the Dockerfile's and v1's (workflows/presets.py: the same CUDA base, torch, dependencies, git and GPT-2's
ranks), built by `flyte run`/`flyte deploy` (Union builds it remotely; locally it needs Docker and
NANOCHAT_IMAGE_REGISTRY to push to). NANOCHAT_FLYTE2_IMAGE names a prebuilt one instead: it must hold the flyte2
extra (the Dockerfile built with --build-arg EXTRAS="[flyte2]").
"""

import os
from pathlib import Path

import flyte

from nanochat_flyte.pipeline import evaluate, prepare, secrets
from nanochat_flyte.pipeline.secrets import SecretName
from workflows.flyte2 import cli  # noqa: F401 - every entry file imports this module: flyte run reads our inputs
from workflows.presets import (
    APT_PACKAGES,
    CUDA_IMAGE,
    DATA_NODE,
    DRIVER_NODE,
    FETCH_GPT2_RANKS,
    PROJECT_DEPENDENCIES,
    REGISTERED_SETTINGS,
    T4_NODE,
    TIKTOKEN_CACHE_DIR,
    TORCH_VERSION,
    Machine,
)

ROOT = Path(__file__).resolve().parents[2]
FLYTE2_DEPENDENCIES = ["flyte>=2.12,<3", "flyteplugins-pytorch>=2.12,<3"]  # pyproject.toml's flyte2 extra
PACKAGE_DIR = "/opt/nanochat-flyte"  # where the image installs the package from


def image() -> flyte.Image | str:
    prebuilt = os.environ.get("NANOCHAT_FLYTE2_IMAGE")
    if prebuilt:
        return prebuilt
    return (flyte.Image.from_base(CUDA_IMAGE)
            .clone(name="nanochat-flyte2", registry=os.environ.get("NANOCHAT_IMAGE_REGISTRY") or None,
                   python_version=(3, 11), extendable=True)
            .with_apt_packages(*APT_PACKAGES)
            .with_pip_packages(f"torch=={TORCH_VERSION}", *PROJECT_DEPENDENCIES, *FLYTE2_DEPENDENCIES)
            # The package itself (the chat app runs its `nanochat` command; tasks import the code bundle's copy).
            # flyte's builder copies sources as the user `flyte`, which a CUDA base image does not have.
            .with_commands(["id -u flyte >/dev/null 2>&1 || useradd --create-home flyte"])
            .with_source_file(ROOT / "pyproject.toml", f"{PACKAGE_DIR}/pyproject.toml")
            .with_source_folder(ROOT / "nanochat_flyte", f"{PACKAGE_DIR}/nanochat_flyte")
            .with_commands([f"uv pip install --python $UV_PYTHON --no-deps {PACKAGE_DIR}"])
            # GPT-2's ranks (tiktoken "r50k_base"), fetched once here so that tasks never download them
            .with_env_vars({"TIKTOKEN_CACHE_DIR": TIKTOKEN_CACHE_DIR})
            .with_commands([FETCH_GPT2_RANKS]))


IMAGE = image()


def declared_secret(secret: SecretName) -> flyte.Secret:
    """A secret by its key alone (`flyte create secret wandb_api_key`), handed to the task as the environment
    variable the library reads. Absent ones are no error."""
    group, key = secret.group_and_key(grouped=False)
    return flyte.Secret(key=key, group=group, as_env_var=secret.env_var)


WANDB_SECRET = declared_secret(secrets.WANDB)  # absent: W&B runs offline
HF_SECRET = declared_secret(secrets.HF)  # only for a gated or private mirror of the datasets
CHAT_API_KEY_SECRET = declared_secret(secrets.CHAT_API_KEY)


def node(machine: Machine) -> flyte.Resources:
    """A machine as a Flyte 2 environment's resources: a GPU node's requests equal its limits, with a /dev/shm."""
    if not machine.gpus:
        return flyte.Resources(cpu=machine.cpu, memory=machine.memory, disk=machine.disk)
    return flyte.Resources(cpu=(machine.cpu, machine.cpu), memory=(machine.memory, machine.memory),
                           gpu=f"{machine.gpu}:{machine.gpus}", shm="auto", disk=machine.disk)


# Keyed by what decides the data, with the library's format versions (not the code's hash, what "auto" takes without
# a version_override: an edit to a task's body must not throw away hours of tokenized shards): a relaunch prepares
# nothing twice. "auto", not "override", which serializes the same: local runs read only an "auto" cache.
DATA_CACHE = flyte.Cache(behavior="auto", version_override=prepare.DATA_VERSION)
# A shard is keyed by its job alone (data_url, index, split, tokenizer fingerprint).
SHARD_CACHE = flyte.Cache(behavior="auto", version_override=prepare.DATA_VERSION,
                          ignored_inputs=("tokenizer_dir",))
CHAT_DATA_CACHE = flyte.Cache(behavior="auto", version_override=prepare.CHAT_DATA_VERSION)
# Scoring the same checkpoint with the same settings again is free.
EVALUATION_CACHE = flyte.Cache(behavior="auto", version_override=evaluate.EVALUATION_VERSION,
                               ignored_inputs=("config",))

# The code bundle holds the Python modules the entry file loads; the presets they read at import (workflows/presets.py)
# come along too, or a task's container could not import its module.
PRESETS = (str(ROOT / "configs"),)

data_env = flyte.TaskEnvironment(name="nanochat_data", image=IMAGE, env_vars=REGISTERED_SETTINGS, secrets=[HF_SECRET],
                                 resources=node(DATA_NODE), include=PRESETS)

# Interruptible: a spot T4 is a third of the price, and a preempted training attempt resumes from its last save.
gpu_env = flyte.TaskEnvironment(name="nanochat_gpu", image=IMAGE, env_vars=REGISTERED_SETTINGS,
                                secrets=[WANDB_SECRET, HF_SECRET], resources=node(T4_NODE), interruptible=True,
                                include=PRESETS)

driver_env = flyte.TaskEnvironment(name="nanochat", image=IMAGE, env_vars=REGISTERED_SETTINGS, secrets=[HF_SECRET],
                                   resources=node(DRIVER_NODE), depends_on=[data_env, gpu_env], include=PRESETS)
