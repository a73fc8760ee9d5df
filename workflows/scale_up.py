"""The same pipeline, scaled up: a depth-12 model on an A100, or on eight A100s with DDP.

    pyflyte run --remote workflows/scale_up.py nanochat_d12_a100
    pyflyte run --remote workflows/scale_up.py nanochat_d12_8xa100

Both reuse main's tasks: the data tasks unchanged (and their cache), the GPU tasks moved to A100 nodes with
`.with_overrides`. The multi-GPU variant runs train_base_model's body once per GPU under torch elastic
(flytekitplugins-kfpytorch); with nnodes=1 it is a plain pod, no Kubeflow operator needed.
"""

from flytekit import Resources, task, workflow
from flytekit.extras.accelerators import A100
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from nanochat_flyte.config import RunConfig
from workflows.image import IMAGE
from workflows.nanochat import (WANDB_SECRET, aggregate_results, download_and_prepare_data, setup_environment,
                                train_base_model)

GPUS = 8  # one full A100 node (a2-highgpu-8g on GCP, p4d.24xlarge on AWS)

# Depth 12: model_dim 768, ~160M parameters with the GPT-2 vocabulary. 20 tokens per parameter (Chinchilla)
# is ~3.2B tokens: 12,000 steps of 262,144 tokens, from 64 shards of ~54M GPT-2 tokens each.
# 262,144 = 32 x 1024 x 8: gradient accumulation 8 on one GPU, 1 on eight. bf16 on the A100 (dtype auto).
D12_CONFIG = RunConfig(depth=12, max_seq_len=1024, device_batch_size=32, total_batch_size=262_144,
                       num_iterations=12_000, num_shards=64, eval_every=250, save_every=250, sample_every=1000)

# a2-highgpu-1g has 12 vCPUs and 85 GB; leave the kubelet its share. Disk as for the T4, plus bigger checkpoints.
A100_NODE = dict(
    accelerator=A100,
    requests=Resources(cpu="10", mem="64Gi", gpu="1", ephemeral_storage="60Gi"),
    limits=Resources(cpu="10", mem="64Gi", gpu="1", ephemeral_storage="60Gi"),
)
# Each rank downloads its own copy of the data directory (~7 GB), hence the disk. Not interruptible: a
# preempted 8-GPU node is slow to come back, and every rank restarts from the last checkpoint.
MULTI_A100_RESOURCES = dict(
    accelerator=A100,
    requests=Resources(cpu="48", mem="256Gi", gpu=str(GPUS), ephemeral_storage="150Gi"),
    limits=Resources(cpu="48", mem="256Gi", gpu=str(GPUS), ephemeral_storage="150Gi"),
)


@task(task_config=Elastic(nnodes=1, nproc_per_node=GPUS), container_image=IMAGE, secret_requests=[WANDB_SECRET],
      retries=3, enable_deck=True, shared_memory=True, **MULTI_A100_RESOURCES)
def train_base_model_multi_gpu(config: RunConfig, data: FlyteDirectory, environment: dict
                               ) -> tuple[FlyteDirectory, dict]:
    """train_base_model in one process per GPU (RANK, LOCAL_RANK, WORLD_SIZE set); flytekit returns rank 0's."""
    return train_base_model.task_function(config=config, data=data, environment=environment)


def pretrain(config: RunConfig, train_task, gpu_node: dict) -> tuple[dict, FlyteDirectory]:
    """main's wiring, with the environment report and the training on `gpu_node`."""
    resolved, environment = setup_environment(config=config).with_overrides(**gpu_node)
    data, manifest = download_and_prepare_data(config=resolved)
    checkpoint, training = train_task(config=resolved, data=data, environment=environment).with_overrides(**gpu_node)
    results = aggregate_results(config=resolved, environment=environment, manifest=manifest, training=training,
                                checkpoint=checkpoint)
    return results, checkpoint


@workflow
def nanochat_d12_a100(config: RunConfig = D12_CONFIG) -> tuple[dict, FlyteDirectory]:
    return pretrain(config, train_base_model, A100_NODE)


@workflow
def nanochat_d12_8xa100(config: RunConfig = D12_CONFIG) -> tuple[dict, FlyteDirectory]:
    return pretrain(config, train_base_model_multi_gpu, dict(MULTI_A100_RESOURCES, interruptible=False))
