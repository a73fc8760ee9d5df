"""What `flyte deploy` would send a Flyte 2 cluster, compiled offline, with no control plane (dns:///127.0.0.1:9):
`flyte deploy --dry-run --all FILE` for every entry file, then the task templates, triggers and app that the same
dry run (flyte.deploy(dry_run=True)) serializes, read back: the machines, secrets, caches, retries, schedules and
the app a cluster would run with, beside workflows/'s (tests/test_packaging.py)."""

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from nanochat_flyte.config import RLConfig, RunConfig
from nanochat_flyte.pipeline.evaluate import EVALUATION_VERSION
from nanochat_flyte.pipeline.prepare import CHAT_DATA_VERSION, DATA_VERSION

ROOT = Path(__file__).resolve().parents[1]
FLYTE = str(Path(sys.executable).with_name("flyte"))
NO_CONTROL_PLANE = ["--endpoint", "dns:///127.0.0.1:9", "--insecure"]
# read at import by the entry files: a prebuilt image (nothing built or looked up), the app's checkpoint, the
# nightly's alert e-mail and the W&B entity of the console link
SETTINGS = {"NANOCHAT_FLYTE2_IMAGE": "ghcr.io/example/nanochat-flyte2:test",
            "NANOCHAT_CHAT_CHECKPOINT": "s3://bucket/run/chat_checkpoint",
            "NANOCHAT_ALERT_EMAILS": "oncall@example.com", "NANOCHAT_WANDB_ENTITY": "ml-team"}
GPU_TASKS = ("describe_training_node", "train_base_model", "evaluate_base_model", "train_chat_model",
             "train_rl_model", "evaluate_chat_model")
DATA_TASKS = ("prepare_tokenizer", "plan_data_shards", "prepare_data_shard", "collect_data")
CHAT_DATA_TASKS = ("prepare_chat_sft_data", "prepare_rl_problems", "prepare_chat_eval_data")


def environment() -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("NANOCHAT_")}
    return {**env, **SETTINGS, "DO_NOT_TRACK": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("file, entities", [
    ("nanochat.py", ["nanochat.main", "nanochat_data.prepare_data_shard", "nanochat_gpu.train_base_model"]),
    ("chat.py", ["nanochat.nanochat_chat_rl", "nanochat_gpu.train_rl_model", "nanochat_data.prepare_rl_problems"]),
    ("scale_up.py", ["nanochat_scale_up.nanochat_d12_8xa100", "nanochat_8xa100.train_base_model_multi_gpu"]),
    ("serve.py", ["nanochat-chat"]),
])
def test_flyte_deploy_dry_run_serializes_each_entry_file(file, entities):
    result = subprocess.run([FLYTE, *NO_CONTROL_PLANE, "-of", "table-simple", "deploy", "--dry-run", "--all",
                             f"workflows/flyte2/{file}"], cwd=ROOT, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in entities:
        assert name in result.stdout, name


def serialize(out: str) -> None:
    """In a process of its own (the entry files read SETTINGS at import): what a dry-run deploy of every
    environment serializes, as JSON in `out`. Triggers are serialized as a real deploy does (a dry run skips them),
    and the W&B links as the platform is handed them."""
    import flyte
    import flyte.extras
    from flyte._internal.runtime.trigger_serde import to_task_trigger
    from google.protobuf.json_format import MessageToDict

    from workflows.flyte2 import chat, nanochat, pretraining, scale_up, serve

    flyte.init(endpoint=NO_CONTROL_PLANE[1], insecure=True, root_dir=ROOT)
    compiled = {"tasks": {}, "triggers": {}, "links": {}, "apps": {}}
    for deployment in flyte.deploy(nanochat.driver_env, scale_up.scale_up_env, serve.chat_app, dry_run=True):
        for env in deployment.envs.values():
            for entity in getattr(env, "deployed_entities", ()):
                compiled["tasks"][entity.deployed_task.task_template.id.name] = MessageToDict(
                    entity.deployed_task.task_template)
            if hasattr(env, "deployed_app"):
                compiled["apps"][env.env.name] = MessageToDict(env.deployed_app.pb2)
    for task in (nanochat.main, chat.chat_rl, chat.nanochat_chat, chat.nanochat_chat_rl):
        spec = flyte.extras.serialize(task)
        for trigger in task.triggers:
            compiled["triggers"][trigger.name] = MessageToDict(asyncio.run(to_task_trigger(
                trigger, task.name, spec.task_template.interface.inputs, list(spec.default_inputs))))
    for task in (pretraining.train_base_model, scale_up.train_base_model_multi_gpu, chat.train_chat_model,
                 chat.train_rl_model):
        compiled["links"][task.name] = [link.get_link(run_name="{{.runName}}", project="", domain="", context={},
                                                      parent_action_name="", action_name="{{.actionName}}",
                                                      pod_name="") for link in task.links]
    Path(out).write_text(json.dumps(compiled))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dry-run") / "compiled.json"
    result = subprocess.run([sys.executable, "-c", f"from tests.test_flyte2_deploy import serialize; "
                                                   f"serialize({str(out)!r})"],
                            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def template_of(compiled: dict, name: str) -> dict:
    (template,) = [template for full_name, template in compiled["tasks"].items() if full_name.endswith(f".{name}")]
    return template


def resources(template: dict) -> tuple[dict, dict]:
    container = template["container"]["resources"]
    return ({r["name"]: r["value"] for r in container["requests"]},
            {r["name"]: r["value"] for r in container.get("limits", [])})


def secrets(template: dict) -> list[tuple[str, str]]:
    return [(secret["key"], secret["envVar"]) for secret in template["securityContext"]["secrets"]]


def config_input(trigger: dict, name: str = "config") -> dict:
    """A trigger's dataclass input, as the msgpack its literal holds."""
    (literal,) = [item for item in trigger["spec"]["inputs"]["literals"] if item["name"] == name]
    return msgpack.loads(base64.b64decode(literal["value"]["scalar"]["binary"]["value"]))


def test_the_gpu_tasks_get_a_t4_with_8_cpus_32gi_shared_memory_and_are_interruptible(compiled):
    for name in GPU_TASKS:
        template = template_of(compiled, name)
        requests, limits = resources(template)
        assert requests == {"CPU": "8", "MEMORY": "32Gi", "GPU": "1", "EPHEMERAL_STORAGE": "50Gi"}, name
        assert limits == {"CPU": "8", "MEMORY": "32Gi"}, name  # a Guaranteed pod, as workflows/support.py's
        assert template["extendedResources"]["gpuAccelerator"]["device"] == "nvidia-tesla-t4", name
        assert template["extendedResources"]["sharedMemory"]["mountPath"] == "/dev/shm", name
        assert template["metadata"]["interruptible"], name
        assert secrets(template) == [("wandb_api_key", "WANDB_API_KEY"), ("hf_token", "HF_TOKEN")], name


def test_training_is_retried_and_never_cached_the_evaluations_are_cached_on_their_scores_inputs(compiled):
    for name in ("train_base_model", "train_chat_model", "train_rl_model"):
        metadata = template_of(compiled, name)["metadata"]
        assert metadata["retries"]["retries"] == 3 and not metadata.get("discoverable"), name
        assert metadata["generatesDeck"], name  # the Training report tab
    for name in ("evaluate_base_model", "evaluate_chat_model"):
        metadata = template_of(compiled, name)["metadata"]
        assert metadata["retries"]["retries"] == 2 and metadata["discoverable"], name
        assert metadata["discoveryVersion"] == EVALUATION_VERSION, name
        assert metadata["cacheIgnoreInputVars"] == ["config"], name
    assert not template_of(compiled, "main")["metadata"]["retries"]  # a user error in the driver is never retried


def test_data_tasks_are_cpu_only_cached_with_the_librarys_format_versions(compiled):
    for names, version in ((DATA_TASKS, DATA_VERSION), (CHAT_DATA_TASKS, CHAT_DATA_VERSION)):
        for name in names:
            template = template_of(compiled, name)
            requests, _ = resources(template)
            assert requests == {"CPU": "4", "MEMORY": "8Gi", "EPHEMERAL_STORAGE": "20Gi"}, name
            assert "extendedResources" not in template, name
            assert template["metadata"]["discoverable"] and template["metadata"]["discoveryVersion"] == version, name
            assert secrets(template) == [("hf_token", "HF_TOKEN")], name
    assert template_of(compiled, "prepare_data_shard")["metadata"]["cacheIgnoreInputVars"] == ["tokenizer_dir"]


def test_every_task_runs_in_the_image_named_by_nanochat_flyte2_image(compiled):
    images = {template["container"]["image"] for template in compiled["tasks"].values()}
    assert images == {SETTINGS["NANOCHAT_FLYTE2_IMAGE"]}


def test_the_nightly_is_an_inactive_cron_trigger_that_mails_on_failure(compiled):
    nightly = compiled["triggers"]["nanochat-nightly"]
    assert nightly["automationSpec"]["schedule"]["cron"]["expression"] == "0 3 * * *"
    assert not nightly["spec"].get("active")  # as workflows/launch_plans.py's: inactive until activated
    (rule,) = nightly["spec"]["runSpec"]["notificationRules"]["rules"]
    assert rule["deliveryTemplate"]["email"]["to"] == [{"address": "oncall@example.com"}]
    assert "ACTION_PHASE_FAILED" in rule["onPhases"]
    assert RunConfig.from_mapping(config_input(nightly)) == RunConfig.from_file(ROOT / "configs" / "d8_t4.yaml")


@pytest.mark.parametrize("trigger, preset", [("nanochat-d8-t4", "d8_t4.yaml"),
                                             ("nanochat-d8-t4-tuned", "d8_t4_tuned.yaml"),
                                             ("nanochat-chat-d8-t4", "d8_t4.yaml"),
                                             ("nanochat-chat-rl-d8-t4", "d8_t4.yaml")])
def test_each_preset_is_a_trigger_fired_on_demand_with_its_inputs(compiled, trigger, preset):
    spec = compiled["triggers"][trigger]
    assert spec["automationSpec"]["type"] == "TYPE_NONE" and spec["spec"]["active"]
    assert RunConfig.from_mapping(config_input(spec)) == RunConfig.from_file(ROOT / "configs" / preset)


def test_the_rl_preset_asks_for_the_chat_checkpoint(compiled):
    spec = compiled["triggers"]["nanochat-rl-d8-t4"]
    # sft_checkpoint has no value: the console asks for it at each firing
    assert [item["name"] for item in spec["spec"]["inputs"]["literals"]] == ["config", "resume_from"]
    assert RLConfig.from_mapping(config_input(spec)) == RLConfig.from_file(ROOT / "configs" / "rl_d8_t4.yaml")


def test_multi_gpu_training_is_one_elastic_pod_with_eight_a100s(compiled):
    template = template_of(compiled, "train_base_model_multi_gpu")
    assert template["type"] == "python-task"  # nnodes=1: torch elastic inside one pod, no PyTorchJob operator
    assert template["custom"]["elasticConfig"]["nprocPerNode"] == 8
    # a failed worker fails the attempt, no restart (0, the default value, is left out of the proto's JSON)
    assert template["custom"]["elasticConfig"].get("maxRestarts", 0) == 0
    requests, _ = resources(template)
    assert requests["GPU"] == "8" and template["extendedResources"]["gpuAccelerator"]["device"] == "nvidia-tesla-a100"
    assert not template["metadata"]["interruptible"]
    assert secrets(template) == [("wandb_api_key", "WANDB_API_KEY"), ("hf_token", "HF_TOKEN")]


def test_training_tasks_link_to_their_wandb_run(compiled):
    runs = "https://wandb.ai/ml-team/nanochat/runs/{{.runName}}"
    assert compiled["links"] == {"nanochat_gpu.train_base_model": [runs],
                                 "nanochat_8xa100.train_base_model_multi_gpu": [runs],
                                 "nanochat_gpu.train_chat_model": [runs + "-chat"],
                                 "nanochat_gpu.train_rl_model": [runs + "-rl"]}


def test_the_chat_app_serves_a_checkpoint_on_a_t4_behind_its_api_key_and_scales_to_zero(compiled):
    spec = compiled["apps"]["nanochat-chat"]["spec"]
    container = spec["container"]
    assert container["args"] == ["nanochat", "serve", "--checkpoint", "/mnt/checkpoint", "--host", "0.0.0.0",
                                 "--port", "8000", "--require-api-key", "--model-name", "run-chat_checkpoint"]
    assert container["ports"] == [{"containerPort": 8000}]
    assert spec["extendedResources"]["gpuAccelerator"]["device"] == "nvidia-tesla-t4"
    assert spec["securityContext"]["secrets"] == [{"key": "nanochat_api_key", "mountRequirement": "ENV_VAR",
                                                   "envVar": "NANOCHAT_API_KEY"}]
    assert spec["autoscaling"]["replicas"] == {"max": 1}  # min 0: scaled to zero
    assert spec["autoscaling"]["scaledownPeriod"] == "900s"
    assert spec["inputs"]["items"] == [{"name": "checkpoint", "stringValue": SETTINGS["NANOCHAT_CHAT_CHECKPOINT"]}]


def bundle(out: str, app: bool = False) -> None:
    """In a process of its own: the code bundle `flyte run` and `flyte deploy` would upload for every entry file (the
    modules they load, and each environment's include), unpacked into `out`; app: the chat app's, whose server
    process imports its entry file again to find the app."""
    import tarfile

    import flyte
    from flyte._code_bundle._includes import collect_env_include_files
    from flyte._code_bundle.bundle import build_code_bundle
    from flyte._deploy import plan_deploy

    from workflows.flyte2 import chat, nanochat, scale_up, serve  # noqa: F401 - loaded, so bundled

    flyte.init(endpoint=NO_CONTROL_PLANE[1], insecure=True, root_dir=ROOT)
    deployed = (serve.chat_app,) if app else (nanochat.driver_env, scale_up.scale_up_env)
    envs = [env for driver in deployed for env in plan_deploy(driver)[0].envs.values()]
    built = asyncio.run(build_code_bundle(ROOT, dryrun=True, copy_style="loaded_modules", copy_bundle_to=Path(out),
                                          additional_files=collect_env_include_files(envs)))
    with tarfile.open(built.tgz) as archive:
        archive.extractall(out, filter="data")
    # the environments whose images `flyte run` readies for the scale-up drivers
    Path(out, "scale_up_envs.json").write_text(json.dumps(sorted(plan_deploy(scale_up.scale_up_env)[0].envs)))


DECLARE_TASKS = """
import json
from flyte._internal.image_cache import ImageCache
from flyte._internal.runtime.task_serde import translate_task_to_wire
from flyte.models import SerializationContext
import workflows.flyte2.pretraining as pretraining
# a prebuilt image is built by nobody: the image cache a driver's pod is handed holds nothing for it
context = SerializationContext(project="p", domain="d", org="o", version="v1", image_cache=ImageCache(image_lookup={}),
                               root_dir=".")
declared = {}
for task in (pretraining.describe_training_node, pretraining.train_base_model):
    template = translate_task_to_wire(task, context).task_template
    declared[task.name] = {"image": template.container.image, "env": {e.key: e.value for e in template.container.env},
                           "secrets": [[s.key, s.env_var] for s in template.security_context.secrets],
                           "links": [repr(link) for link in task.links]}
print(json.dumps(declared))
"""


def declared_tasks(env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", DECLARE_TASKS], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_driver_pod_declares_the_tasks_it_starts_as_they_were_registered():
    """On a cluster a driver task declares each task it starts, in its own pod, which has the environment's env_vars
    and not the registering shell's: the prebuilt image, renamed secrets and the W&B link must come out the same."""
    registering = {**environment(), "NANOCHAT_WANDB_SECRET_KEY": "team_wandb", "NANOCHAT_HF_SECRET_KEY": "team_hf"}
    registered = declared_tasks(registering)
    train = registered["nanochat_gpu.train_base_model"]
    assert train["image"] == SETTINGS["NANOCHAT_FLYTE2_IMAGE"]
    assert train["secrets"] == [["team_wandb", "WANDB_API_KEY"], ["team_hf", "HF_TOKEN"]]
    assert "entity='ml-team'" in train["links"][0]
    driver_pod = {name: value for name, value in registering.items() if not name.startswith("NANOCHAT_")}
    assert declared_tasks({**driver_pod, **train["env"]}) == registered


def test_a_task_container_imports_every_entry_file_from_the_code_bundle_alone_and_finds_its_images(tmp_path):
    """A task's container has the image and the code bundle, not the checkout: every entry file must import from the
    bundle, the presets it reads at import (workflows/presets.py) included."""
    result = subprocess.run([sys.executable, "-c", f"from tests.test_flyte2_deploy import bundle; "
                                                   f"bundle({str(tmp_path)!r})"],
                            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "configs" / "d8_t4.yaml").is_file()
    container = {**environment(), "PYTHONPATH": str(tmp_path)}  # the bundle where the checkout was
    imported = subprocess.run([sys.executable, "-c", "import workflows.flyte2.chat, workflows.flyte2.nanochat, "
                                                     "workflows.flyte2.scale_up, workflows.presets as p; "
                                                     "print(p.__file__)"],
                              cwd=tmp_path, env=container, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip() == str(tmp_path / "workflows" / "presets.py")
    # and a scale-up driver can start the 8-GPU task: its environment is among those readied with the driver's
    assert json.loads((tmp_path / "scale_up_envs.json").read_text()) == ["nanochat_8xa100", "nanochat_data",
                                                                        "nanochat_gpu", "nanochat_scale_up"]


def test_the_chat_apps_server_imports_its_entry_file_from_the_apps_own_code_bundle(tmp_path):
    """`fserve` finds the app by importing workflows/flyte2/serve.py from the bundle `flyte deploy` uploads for it
    alone; that import reads the presets, which must come along."""
    result = subprocess.run([sys.executable, "-c", f"from tests.test_flyte2_deploy import bundle; "
                                                   f"bundle({str(tmp_path)!r}, app=True)"],
                            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    server = {**environment(), "PYTHONPATH": str(tmp_path)}  # the app's bundle where the checkout was
    imported = subprocess.run([sys.executable, "-c", "from workflows.flyte2.serve import chat_app; "
                                                     "print(chat_app.name)"],
                              cwd=tmp_path, env=server, capture_output=True, text=True, timeout=300)
    assert (imported.returncode, imported.stdout.strip()) == (0, "nanochat-chat"), imported.stderr[-3000:]


def test_every_input_of_an_entry_task_has_a_description_for_the_console():
    """flyte deploy sends each input's description, from the docstring's Args, to the launch form."""
    from workflows.flyte2 import chat, nanochat, scale_up

    for entry in (nanochat.main, chat.chat_sft, chat.chat_rl, chat.nanochat_chat, chat.nanochat_chat_rl,
                  scale_up.nanochat_d12_a100, scale_up.nanochat_d12_8xa100):
        described = entry.native_interface.docstring.input_descriptions
        assert [name for name in entry.native_interface.inputs if not described.get(name)] == [], entry.name
