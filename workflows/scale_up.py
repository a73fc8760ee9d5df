"""The same pipeline, scaled up: a depth-12 model on an A100, or on eight A100s with DDP.

    pyflyte run --remote workflows/scale_up.py nanochat_d12_a100
    pyflyte run --remote workflows/scale_up.py nanochat_d12_8xa100

Both reuse main's tasks: the data tasks unchanged (and their cache), the GPU tasks moved to A100 nodes with
`.with_overrides`. The multi-GPU variant runs train_base_model's body once per GPU under torch elastic
(flytekitplugins-kfpytorch); with nnodes=1 it is a plain pod, no Kubeflow operator needed.
"""

from flytekit import task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from nanochat_flyte.config import RunConfig
from workflows.image import IMAGE
from workflows.nanochat import RunOutputs, pretrain, train_base_model
from workflows.presets import A100_NODE, D12_CONFIG, EIGHT_A100_NODE
from workflows.support import HF_SECRET, WANDB_SECRET, task_resources, wandb_console_link, with_secrets

GPUS = EIGHT_A100_NODE.gpus
# Not interruptible: a preempted 8-GPU node is slow to come back, and every rank restarts from the last checkpoint.
EIGHT_A100_TASK = dict(task_resources(EIGHT_A100_NODE), interruptible=False)


# max_restarts=0, as Flyte 2's: a worker's failure fails the attempt, whose retry resumes from its last save
@task(task_config=Elastic(nnodes=1, nproc_per_node=GPUS, max_restarts=0), container_image=IMAGE,
      **with_secrets(WANDB_SECRET, HF_SECRET), retries=3, enable_deck=True, **EIGHT_A100_TASK)
@wandb_console_link
def train_base_model_multi_gpu(config: RunConfig, data: FlyteDirectory, environment: dict, resume_from: str
                               ) -> tuple[FlyteDirectory, dict]:
    """train_base_model in one process per GPU (RANK, LOCAL_RANK, WORLD_SIZE set); flytekit returns rank 0's."""
    return train_base_model.task_function(config=config, data=data, environment=environment, resume_from=resume_from)


@workflow
def nanochat_d12_a100(config: RunConfig = D12_CONFIG, resume_from: str = "") -> RunOutputs:
    """main's run at d12 (configs/d12_a100.yaml) on one A100.

    Args:
        config: the run's settings (RunConfig: the d12 preset's values); a relaunch may edit any field.
        resume_from: as main's: a checkpoint to continue. Empty: a new run.
    """
    return pretrain(config, resume_from, train_base_model, task_resources(A100_NODE), entry="nanochat_d12_a100")


@workflow
def nanochat_d12_8xa100(config: RunConfig = D12_CONFIG, resume_from: str = "") -> RunOutputs:
    """main's run at d12 (configs/d12_a100.yaml) on the 8 A100s of one node, a process per GPU.

    Args:
        config: the run's settings (RunConfig: the d12 preset's values); a relaunch may edit any field.
        resume_from: as main's: a checkpoint to continue. Empty: a new run.
    """
    # CORE runs in one process: on one A100, not on seven idle ones beside it
    return pretrain(config, resume_from, train_base_model_multi_gpu, EIGHT_A100_TASK, world_size=GPUS,
                    entry="nanochat_d12_8xa100", core_node=task_resources(A100_NODE))
