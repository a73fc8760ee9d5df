"""The same pipeline, scaled up on Flyte 2, as workflows/scale_up.py: a depth-12 model on an A100, or on eight A100s
with DDP.

    flyte run workflows/flyte2/scale_up.py nanochat_d12_a100
    flyte run workflows/flyte2/scale_up.py nanochat_d12_8xa100

Both reuse main's tasks: the data tasks unchanged (and their cache), the GPU tasks moved to A100 nodes with
`.override`. The multi-GPU variant runs train_base_model's body once per GPU under torch elastic (flyteplugins-pytorch);
with nnodes=1 it is a plain pod, no Kubeflow operator needed.
"""

import flyte
from flyte.io import Dir

from nanochat_flyte.config import RunConfig
from workflows.flyte2.environments import (
    HF_SECRET,
    IMAGE,
    PRESETS,
    WANDB_SECRET,
    data_env,
    driver_env,
    gpu_env,
    node,
)
from workflows.flyte2.pretraining import RunOutputs, pretrain, train_base_model
from workflows.flyte2.support import ElasticUserErrors, one_line_user_errors, wandb_links
from workflows.presets import A100_NODE, D12_CONFIG, EIGHT_A100_NODE, REGISTERED_SETTINGS

GPUS = EIGHT_A100_NODE.gpus

# Not interruptible: a preempted 8-GPU node is slow to come back, and every rank restarts from the last checkpoint.
# max_restarts=0 (the plugin's default is 3; v1's is 0): a worker's failure fails the attempt, whose retry resumes from
# its last save. torch elastic's restart in the same pod would start over from the previous attempt's, and run a
# user error again.
multi_gpu_env = flyte.TaskEnvironment(name="nanochat_8xa100", image=IMAGE, env_vars=REGISTERED_SETTINGS,
                                      secrets=[WANDB_SECRET, HF_SECRET], resources=node(EIGHT_A100_NODE),
                                      plugin_config=ElasticUserErrors(nnodes=1, nproc_per_node=GPUS, max_restarts=0),
                                      include=PRESETS)
# The drivers of these runs start the 8-GPU task too: flyte run readies the images of the driver's environment and
# of those it depends on, and a task whose environment is not among them cannot start.
scale_up_env = driver_env.clone_with(name="nanochat_scale_up", depends_on=[data_env, gpu_env, multi_gpu_env])


@multi_gpu_env.task(retries=3, report=True, links=wandb_links())
def train_base_model_multi_gpu(config: RunConfig, data: Dir, environment: dict, resume_from: str) -> tuple[Dir, dict]:
    """train_base_model in one process per GPU (RANK, LOCAL_RANK, WORLD_SIZE set); the task returns rank 0's."""
    return train_base_model.forward(config, data, environment, resume_from)


@scale_up_env.task
@one_line_user_errors
async def nanochat_d12_a100(config: RunConfig = D12_CONFIG, resume_from: str = "") -> RunOutputs:
    """main's run at d12 (configs/d12_a100.yaml) on one A100.

    Args:
        config: the run's settings (RunConfig: the d12 preset's values); a relaunch may edit any field.
        resume_from: as main's: a checkpoint to continue. Empty: a new run.
    """
    return await pretrain(config, resume_from, gpu=dict(resources=node(A100_NODE)), entry="nanochat_d12_a100")


@scale_up_env.task
@one_line_user_errors
async def nanochat_d12_8xa100(config: RunConfig = D12_CONFIG, resume_from: str = "") -> RunOutputs:
    """main's run at d12 (configs/d12_a100.yaml) on the 8 A100s of one node, a process per GPU.

    Args:
        config: the run's settings (RunConfig: the d12 preset's values); a relaunch may edit any field.
        resume_from: as main's: a checkpoint to continue. Empty: a new run.
    """
    # CORE runs in one process: on one A100, not on seven idle ones beside it
    return await pretrain(config, resume_from, train_base_model_multi_gpu,
                          dict(resources=node(EIGHT_A100_NODE), interruptible=False), world_size=GPUS,
                          entry="nanochat_d12_8xa100", core_gpu=dict(resources=node(A100_NODE)))
