"""Compile everything a cluster would get, offline: `pyflyte --pkgs workflows package`, then read the protobufs.

This is what `pyflyte register` uploads (tasks, workflows, launch plans), so the resources, secrets, retries,
caching and schedules asserted here are the ones a cluster would run with.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from flyteidl.admin.launch_plan_pb2 import LaunchPlan
from flyteidl.admin.task_pb2 import TaskSpec
from flyteidl.admin.workflow_pb2 import WorkflowSpec
from flyteidl.core.execution_pb2 import WorkflowExecution
from flyteidl.core.tasks_pb2 import Resources
from flytekit import FlyteContextManager, current_context, task
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import Literal

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.pipeline import secrets
from workflows.chat import CHAT_DATA_CACHE_VERSION
from workflows.nanochat import DATA_CACHE_VERSION

ROOT = Path(__file__).resolve().parents[1]
PREBUILT_IMAGE = "ghcr.io/example/nanochat-flyte:test"
ALERT_EMAIL = "oncall@example.com"
CPU, GPU, MEMORY, STORAGE = (Resources.ResourceName.Value(name)
                             for name in ("CPU", "GPU", "MEMORY", "EPHEMERAL_STORAGE"))
DATA_TASKS = ("prepare_tokenizer", "plan_data_shards", "prepare_data_shard", "collect_data")


def package(tmp_path: Path, **settings: str) -> dict[str, dict]:
    """Run `pyflyte package` with these NANOCHAT_* settings; entities by kind ("task", ...) and short name."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NANOCHAT_")}
    env.update(NANOCHAT_IMAGE=PREBUILT_IMAGE, **settings)  # a prebuilt image: nothing to build here
    output = tmp_path / "pkg.tgz"
    result = subprocess.run([sys.executable, "-m", "flytekit.clis.sdk_in_container.pyflyte", "--pkgs", "workflows",
                             "package", "--image", "ghcr.io/example/default:test", "-f", "--output", str(output)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # Files are named <index>_<entity name>_<ResourceType>.pb: 1 task, 2 workflow, 3 launch plan.
    kinds = {"1": ("task", TaskSpec), "2": ("workflow", WorkflowSpec), "3": ("launch_plan", LaunchPlan)}
    entities = {"task": {}, "workflow": {}, "launch_plan": {}}
    with tarfile.open(output) as tar:
        for member in tar.getmembers():
            name, _, resource_type = member.name.removesuffix(".pb").rpartition("_")
            kind, message_type = kinds[resource_type]
            message = message_type.FromString(tar.extractfile(member).read())
            entities[kind][name.split("_", 1)[1].rpartition(".")[2]] = message
    return entities


@pytest.fixture(scope="module")
def entities(tmp_path_factory):
    return package(tmp_path_factory.mktemp("default"), NANOCHAT_ALERT_EMAILS=ALERT_EMAIL)


@pytest.fixture(scope="module")
def tasks(entities):
    return {name: spec.template for name, spec in entities["task"].items()}


def resources(template) -> tuple[dict, dict]:
    container = template.container.resources
    return ({r.name: r.value for r in container.requests}, {r.name: r.value for r in container.limits})


def config_default(launch_plan: LaunchPlan) -> RunConfig:
    literal = Literal.from_flyte_idl(launch_plan.spec.default_inputs.parameters["config"].default)
    return TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, RunConfig)


def test_the_checks_and_the_results_ask_for_the_drivers_machine(tasks):
    """The small CPU tasks get what Flyte 2's driver gets (presets.DRIVER_NODE), not a platform's default, which
    may be too small for torch and the report card's plots."""
    for name in ("check_run_config", "check_chat_config", "check_chat_and_rl_configs", "check_chat_stage",
                 "check_rl_stage", "aggregate_results", "aggregate_chat_results", "aggregate_rl_results", "no_core"):
        assert resources(tasks[name]) == ({CPU: "1", MEMORY: "4Gi", STORAGE: "10Gi"}, {}), name


def test_train_base_model_gets_the_reference_machine(tasks):
    train = tasks["train_base_model"]
    requests, limits = resources(train)
    assert requests == limits == {CPU: "8", MEMORY: "32Gi", GPU: "1", STORAGE: "50Gi"}
    assert train.extended_resources.gpu_accelerator.device == "nvidia-tesla-t4"
    assert train.extended_resources.shared_memory.mount_path == "/dev/shm"


def test_train_base_model_is_interruptible_with_retries_and_the_wandb_and_hf_secrets(tasks):
    train = tasks["train_base_model"]
    assert train.metadata.interruptible and train.metadata.retries.retries == 3
    assert not train.metadata.discoverable  # a training run is never served from cache
    # the HF token: CORE during training (core_metric_every) reads a bundle that may be on a gated mirror
    assert [(s.group, s.key) for s in train.security_context.secrets] == [("wandb", "api_key"), ("hf", "token")]


def test_the_environment_report_comes_from_the_training_node(tasks):
    describe, train = tasks["describe_training_node"], tasks["train_base_model"]
    assert resources(describe) == resources(train)
    assert describe.extended_resources == train.extended_resources
    assert describe.metadata.interruptible
    assert [(s.group, s.key) for s in describe.security_context.secrets] == [("wandb", "api_key")]


@pytest.mark.parametrize("workflow, check", [("main", "check_run_config"), ("chat_sft", "check_chat_stage"),
                                             ("chat_rl", "check_rl_stage")])
def test_inputs_are_checked_on_a_cpu_before_a_gpu_node_is_asked_for(entities, tasks, workflow, check):
    """A bad input fails in one line without waiting for a T4 node (the environment report's task waits for it)."""
    nodes = {node.id: node for node in entities["workflow"][workflow].template.nodes}

    def node_of(task: str) -> str:
        (node_id,) = [node_id for node_id, node in nodes.items()
                      if node.task_node.reference_id.name.endswith(f".{task}")]
        return node_id

    assert node_of(check) in nodes[node_of("describe_training_node")].upstream_node_ids
    requests, limits = resources(tasks[check])
    assert GPU not in requests and GPU not in limits
    assert not tasks[check].extended_resources.HasField("gpu_accelerator")
    assert ("hf", "token") in [(s.group, s.key) for s in tasks[check].security_context.secrets]


def test_tasks_that_download_shards_can_read_the_hf_token(tasks):
    for name in ("check_run_config", "prepare_tokenizer", "plan_data_shards", "prepare_data_shard"):
        assert ("hf", "token") in [(s.group, s.key) for s in tasks[name].security_context.secrets], name


def test_data_tasks_are_cpu_only_and_cached_with_an_explicit_version(tasks):
    for name in DATA_TASKS:
        requests, limits = resources(tasks[name])
        assert GPU not in requests and GPU not in limits, name
        assert not tasks[name].extended_resources.HasField("gpu_accelerator"), name
        assert tasks[name].metadata.discoverable and tasks[name].metadata.discovery_version == DATA_CACHE_VERSION, name
    assert list(tasks["prepare_data_shard"].metadata.cache_ignore_input_vars) == ["tokenizer_dir"]


def test_chat_data_tasks_are_cpu_only_and_cached(tasks):
    for name in ("prepare_chat_sft_data", "prepare_chat_eval_data", "prepare_rl_problems"):
        requests, limits = resources(tasks[name])
        assert GPU not in requests and GPU not in limits, name
        assert tasks[name].metadata.discoverable and tasks[name].metadata.discovery_version == CHAT_DATA_CACHE_VERSION
        assert ("hf", "token") in [(s.group, s.key) for s in tasks[name].security_context.secrets], name


def test_sft_and_the_evaluations_run_on_the_training_node(tasks):
    for name in ("train_chat_model", "train_rl_model", "evaluate_base_model", "evaluate_chat_model"):
        assert resources(tasks[name]) == resources(tasks["train_base_model"]), name
        assert tasks[name].extended_resources == tasks["train_base_model"].extended_resources, name
    for name in ("train_chat_model", "train_rl_model"):
        assert tasks[name].metadata.interruptible and tasks[name].metadata.retries.retries == 3, name
        assert not tasks[name].metadata.discoverable, name
    for name in ("evaluate_base_model", "evaluate_chat_model"):  # the same checkpoint is never scored twice
        assert tasks[name].metadata.discoverable and list(tasks[name].metadata.cache_ignore_input_vars) == ["config"]


def test_the_pipeline_launch_plan_defaults_to_the_reference_presets(entities):
    plan = entities["launch_plan"]["nanochat_chat_d8_t4"]
    assert plan.spec.workflow_id.name == "workflows.chat.nanochat_chat"
    assert config_default(plan) == RunConfig.from_file(ROOT / "configs" / "d8_t4.yaml")
    literal = Literal.from_flyte_idl(plan.spec.default_inputs.parameters["chat_config"].default)
    chat = TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, ChatConfig)
    assert chat == ChatConfig.from_file(ROOT / "configs" / "chat_d8_t4.yaml")


def test_the_pipeline_with_rl_launch_plan_defaults_to_the_three_reference_presets(entities):
    plan = entities["launch_plan"]["nanochat_chat_rl_d8_t4"]
    assert plan.spec.workflow_id.name == "workflows.chat.nanochat_chat_rl"
    assert config_default(plan) == RunConfig.from_file(ROOT / "configs" / "d8_t4.yaml")
    defaults = {name: TypeEngine.to_python_value(FlyteContextManager.current_context(), Literal.from_flyte_idl(
        plan.spec.default_inputs.parameters[name].default), kind)
        for name, kind in (("chat_config", ChatConfig), ("rl_config", RLConfig))}
    assert defaults == {"chat_config": ChatConfig.from_file(ROOT / "configs" / "chat_d8_t4.yaml"),
                        "rl_config": RLConfig.from_file(ROOT / "configs" / "rl_d8_t4.yaml")}


@pytest.mark.parametrize("workflow, check", [("nanochat_chat", "check_chat_config"),
                                             ("nanochat_chat_rl", "check_chat_and_rl_configs")])
def test_a_pipeline_checks_its_later_configs_on_a_cpu_before_pretraining_starts(entities, tasks, workflow, check):
    nodes = {node.id: node for node in entities["workflow"][workflow].template.nodes}
    (check_id,) = [node_id for node_id, node in nodes.items() if node.task_node.reference_id.name.endswith(check)]
    (setup_id,) = [node_id for node_id, node in nodes.items()
                   if node.task_node.reference_id.name.endswith(".check_run_config")]
    assert check_id in nodes[setup_id].upstream_node_ids
    requests, limits = resources(tasks[check])
    assert GPU not in requests and GPU not in limits
    assert not tasks[check].extended_resources.HasField("gpu_accelerator")


def test_the_rl_launch_plan_defaults_to_the_rl_preset_and_asks_for_the_checkpoint(entities):
    plan = entities["launch_plan"]["nanochat_rl_d8_t4"]
    assert plan.spec.workflow_id.name == "workflows.chat.chat_rl"
    literal = Literal.from_flyte_idl(plan.spec.default_inputs.parameters["config"].default)
    rl = TypeEngine.to_python_value(FlyteContextManager.current_context(), literal, RLConfig)
    assert rl == RLConfig.from_file(ROOT / "configs" / "rl_d8_t4.yaml")
    assert plan.spec.default_inputs.parameters["sft_checkpoint"].required


def test_shard_fan_out_has_a_concurrency_limit(entities):
    nodes = entities["workflow"]["download_and_prepare_data"].template.nodes
    (fan_out,) = [node for node in nodes if node.HasField("array_node")]
    assert fan_out.array_node.parallelism == 8


def test_every_task_uses_the_image_named_by_nanochat_image(tasks):
    assert {template.container.image for template in tasks.values()} == {PREBUILT_IMAGE}


def test_reference_launch_plan_defaults_to_the_d8_t4_preset(entities):
    plan = entities["launch_plan"]["nanochat_d8_t4"]
    assert plan.spec.workflow_id.name == "workflows.nanochat.main"
    assert config_default(plan) == RunConfig.from_file(ROOT / "configs" / "d8_t4.yaml")
    assert not plan.spec.entity_metadata.HasField("schedule")


def test_tuned_launch_plan_defaults_to_the_tuned_preset(entities):
    plan = entities["launch_plan"]["nanochat_d8_t4_tuned"]
    assert plan.spec.workflow_id.name == "workflows.nanochat.main"
    assert config_default(plan) == RunConfig.from_file(ROOT / "configs" / "d8_t4_tuned.yaml")
    assert config_default(plan).residual_scalars


def test_nightly_launch_plan_is_scheduled_and_mails_on_failure(entities):
    plan = entities["launch_plan"]["nanochat_nightly"]
    assert config_default(plan) == RunConfig.from_file(ROOT / "configs" / "d8_t4.yaml")
    assert plan.spec.entity_metadata.schedule.cron_schedule.schedule == "0 3 * * *"
    (notification,) = plan.spec.entity_metadata.notifications
    assert list(notification.email.recipients_email) == [ALERT_EMAIL]
    assert WorkflowExecution.FAILED in notification.phases


def test_scale_up_moves_the_gpu_tasks_to_a100s(entities, tasks):
    single = entities["workflow"]["nanochat_d12_a100"].template
    overridden = [node for node in single.nodes if node.task_node.overrides.HasField("extended_resources")]
    assert sorted(node.task_node.reference_id.name.rpartition(".")[2] for node in overridden) == [
        "describe_training_node", "train_base_model"]
    for node in overridden:
        assert node.task_node.overrides.extended_resources.gpu_accelerator.device == "nvidia-tesla-a100"
        assert {r.name: r.value for r in node.task_node.overrides.resources.limits}[GPU] == "1"
    assert config_default(entities["launch_plan"]["nanochat_d12_a100"]).depth == 12


def overridden_gpus(workflow) -> dict[str, str]:
    """Each task node's GPU count where the workflow overrides its resources, branches (CORE's) included."""
    gpus, nodes = {}, list(workflow.nodes)
    while nodes:
        node = nodes.pop()
        if node.HasField("branch_node"):
            branches = node.branch_node.if_else
            nodes += [branches.case.then_node, *(case.then_node for case in branches.other), branches.else_node]
        elif node.task_node.overrides.HasField("resources"):
            limits = {r.name: r.value for r in node.task_node.overrides.resources.limits}
            gpus[node.task_node.reference_id.name.rpartition(".")[2]] = limits[GPU]
    return gpus


def test_the_eight_gpu_run_scores_core_on_one_a100(entities):
    assert overridden_gpus(entities["workflow"]["nanochat_d12_8xa100"].template) == {
        "describe_training_node": "8", "train_base_model_multi_gpu": "8", "evaluate_base_model": "1"}
    assert overridden_gpus(entities["workflow"]["nanochat_d12_a100"].template) == {
        "describe_training_node": "1", "train_base_model": "1", "evaluate_base_model": "1"}


def test_multi_gpu_training_is_one_elastic_pod_with_eight_a100s(tasks):
    ddp = tasks["train_base_model_multi_gpu"]
    assert ddp.type == "python-task"  # nnodes=1: torch elastic inside one pod, no PyTorchJob operator
    requests, limits = resources(ddp)
    assert requests[GPU] == limits[GPU] == "8"
    assert ddp.extended_resources.gpu_accelerator.device == "nvidia-tesla-a100"
    assert [(s.group, s.key) for s in ddp.security_context.secrets] == [("wandb", "api_key"), ("hf", "token")]
    assert "link_type" not in ddp.config  # no NANOCHAT_WANDB_ENTITY: no W&B console link


def test_secret_names_schedule_and_alerts_are_set_without_editing_code(tmp_path):
    entities = package(tmp_path, NANOCHAT_WANDB_SECRET_GROUP="ml-team", NANOCHAT_WANDB_SECRET_KEY="wandb-key",
                       NANOCHAT_NIGHTLY_CRON="30 1 * * 1-5", NANOCHAT_WANDB_ENTITY="ml-team")
    train = entities["task"]["train_base_model"].template
    assert [(s.group, s.key) for s in train.security_context.secrets] == [("ml-team", "wandb-key"), ("hf", "token")]
    # the console's W&B link: the cluster's wandb-execution-id template filled from the task's config
    link = {"link_type": "wandb-execution-id", "host": "https://wandb.ai", "entity": "ml-team", "project": "nanochat"}
    for name in ("train_base_model", "train_base_model_multi_gpu"):
        assert dict(entities["task"][name].template.config) == link, name
    # SFT's and RL's runs are <execution>-chat and <execution>-rl: the cluster's second template adds the stage
    for name, stage in (("train_chat_model", "chat"), ("train_rl_model", "rl")):
        assert dict(entities["task"][name].template.config) == {**link, "link_type": "wandb-execution-id-stage",
                                                                "stage": stage}, name
    nightly = entities["launch_plan"]["nanochat_nightly"]
    assert nightly.spec.entity_metadata.schedule.cron_schedule.schedule == "30 1 * * 1-5"
    assert not nightly.spec.entity_metadata.notifications  # no NANOCHAT_ALERT_EMAILS: no e-mail
    # The task's pod imports the workflows without the registering shell's settings but with the task's own
    # environment, which carries them: it looks the secret up under the name it was registered with.
    pod = {name: value for name, value in os.environ.items() if not name.startswith(("NANOCHAT_", "WANDB_"))}
    pod.update({pair.key: pair.value for pair in train.container.env}, **{"_FSEC_ML-TEAM_WANDB-KEY": "key-from-secret"})
    for name, entity in entities["task"].items():  # every task, so that one reading a setting later finds it too
        assert {pair.key: pair.value for pair in entity.template.container.env}["NANOCHAT_WANDB_SECRET_KEY"] == \
            "wandb-key", name
    found = subprocess.run([sys.executable, "-c", "from tests.test_packaging import wandb_key_after_loading; "
                                                  "print(wandb_key_after_loading())"],
                           cwd=ROOT, env=pod, capture_output=True, text=True, timeout=120)
    assert found.stdout.splitlines()[-1:] == ["key-from-secret"], found.stdout + found.stderr


@task
def read_secret(group: str, key: str) -> str:
    """Inside a task, as a local `pyflyte run` executes it (secret lookups differ outside one)."""
    return current_context().secrets.get(group or None, key)


@task
def wandb_key_after_loading() -> str:
    from workflows.support import export_secret

    export_secret(secrets.WANDB)
    return os.environ.get("WANDB_API_KEY", "")


@pytest.mark.parametrize("needs_group", [True, False], ids=["flyte", "union"])
def test_a_local_run_reads_the_wandb_secret_from_wandb_api_key(monkeypatch, needs_group):
    """The project's W&B secret, named as each platform names it (wandb/api_key; wandb_api_key)."""
    group, key = secrets.WANDB.group_and_key(needs_group)
    assert (group, key) == (("wandb", "api_key") if needs_group else (None, "wandb_api_key"))
    monkeypatch.setenv("WANDB_API_KEY", "key-from-env")
    assert read_secret(group=group or "", key=key) == "key-from-env"


def test_a_cluster_pod_passes_the_injected_secret_to_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("_FSEC_WANDB_API_KEY", "key-from-secret")  # how Flyte injects group wandb, key api_key
    assert wandb_key_after_loading() == "key-from-secret"


def test_pyflyte_loads_the_flytekit_workflows_without_the_flyte2_extra():
    """`pyflyte register workflows` imports every module under workflows/, workflows/flyte2/ included: without the
    flyte package (the flyte2 extra) that folder must show it none, not fail the registration."""
    code = ("import sys; sys.modules['flyte'] = None  # as if not installed\n"
            "from flytekit.tools.module_loader import just_load_modules\n"
            "just_load_modules(['workflows'])\n"
            "print(sorted(name for name in sys.modules if name.startswith('workflows')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout
    assert "'workflows.launch_plans'" in loaded and "'workflows.scale_up'" in loaded
    assert "'workflows.flyte2'" in loaded and "'workflows.flyte2.nanochat'" not in loaded


def test_a_nightly_schedule_that_is_no_cron_expression_is_named_before_registering():
    """(Flyte 2's trigger took it as it was: the server, or nobody, would find the typo at deploy.)"""
    result = subprocess.run([sys.executable, "-c", "import workflows.presets"], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "NANOCHAT_NIGHTLY_CRON": "0 3 * *"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(
        "environment.NANOCHAT_NIGHTLY_CRON: not a cron expression: '0 3 * *'")
