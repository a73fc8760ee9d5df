"""Before any download or GPU time: each stage's inputs checked (a bad field, a missing checkpoint, an unreachable
URL is one line naming it), and the machine the training gets described.
"""

import dataclasses

from nanochat_flyte.config import EVAL_BUNDLE_URL, ChatConfig, RLConfig, RunConfig
from nanochat_flyte.data.chat_data import check_hub_endpoint, check_mixture_fits
from nanochat_flyte.data.download import check_data_url
from nanochat_flyte.data.hub import hub_endpoint
from nanochat_flyte.errors import ConfigError, location_named
from nanochat_flyte.evaluation.bundle import check_bundle_url, load_bundle
from nanochat_flyte.evaluation.chat_eval import require_sandbox
from nanochat_flyte.evaluation.core import check_max_per_task
from nanochat_flyte.model.checkpoint import (
    check_save_to,
    check_save_to_apart,
    check_weights_whole,
    checkpoint_run_config,
)
from nanochat_flyte.model.device import select_device
from nanochat_flyte.pipeline import Show
from nanochat_flyte.pipeline.prepare import RL_DATA_FIELDS, SFT_DATA_FIELDS
from nanochat_flyte.reporting.environment import environment_report, format_report
from nanochat_flyte.reporting.report import environment_deck_html
from nanochat_flyte.schema import check_no_surrounding_space
from nanochat_flyte.training.resume import check_base_resume, check_chat_resume, check_resumed_stage
from nanochat_flyte.training.rl import check_sft_checkpoint, rl_run_config
from nanochat_flyte.training.sft import check_base_checkpoint, sft_run_config


def base_run(config: RunConfig, resume_from: str, world_size: int = 1, entry: str = "main",
             remote: bool = False) -> RunConfig:
    """Pretraining's config, named and validated for `world_size` GPUs (the batch splits over them); the checkpoint
    to resume (a directory or URI, the input `resume_from` of the workflow `entry`) and save_to checked (remote: a
    run on a cluster, where it must be an object store URI); the data probed; a CORE bundle other than nanochat's
    read whole (a URL's downloaded into the cache), before training rather than after it: it is well formed, and
    core_max_per_task leaves its few-shot prompts enough items. Returns the config the run uses."""
    config.validate(world_size)
    check_device_here(config, remote)
    continues = ""
    if resume_from:
        saved = check_base_resume(config, resume_from, owner=entry)
        continues = saved["run_name"]
        if not config.run_name:  # the resumed run's name: its W&B run, and the names the later stages take from it
            config = dataclasses.replace(config, run_name=continues)
    config = config.resolved()
    check_save_to(config.save_to, "RunConfig", remote, continues)
    check_data_url(config)
    if config.core_enabled:
        check_bundle_url(config.eval_bundle_url)
        if config.eval_bundle_url != EVAL_BUNDLE_URL:  # (validate() knows nanochat's shots) read, downloaded if need be
            check_max_per_task(load_bundle(config.eval_bundle_url), config.core_max_per_task)
    return config


def later_stages(config: RunConfig, chat_config: ChatConfig, rl_config: RLConfig | None = None,
                 resume_from: str = "", remote: bool = False) -> tuple[ChatConfig, RLConfig | None]:
    """A pipeline's chat (and RL) configs, checked against its base run (continuing `resume_from`, when set) before
    pretraining starts: the stages' own checks run hours later, and a relaunch from the console with edited inputs
    checks nothing."""
    chat_config = chat_config.validate()
    sft = sft_run_config(chat_config, config.validate())
    # no later stage may save over a model the pipeline starts from or makes
    base_models = [(config.save_to, "base model (RunConfig.save_to)"), (resume_from, "pretraining's resume_from")]
    for base_model, field in base_models:
        check_save_to_apart(chat_config.save_to, base_model, field, "ChatConfig")
    if rl_config is not None:
        rl_config = rl_config.validate()
        rl_run_config(rl_config, sft)
        for start, field in [(chat_config.save_to, "chat model (ChatConfig.save_to)"), *base_models]:
            check_save_to_apart(rl_config.save_to, start, field, "RLConfig")
    for stage in (chat_config, rl_config) if rl_config is not None else (chat_config,):  # then the world's checks
        probe_stage(stage, remote)
    return chat_config, rl_config


def sft_start(config: ChatConfig, base_checkpoint: str) -> ChatConfig:
    """SFT's config, validated and checked against the base checkpoint (a directory or URI) it starts from, from its
    small files alone: a base checkpoint, a batch that fits its model and context, save_to elsewhere. The
    workflows and `nanochat sft` check alike."""
    config = config.validate()
    with location_named(base_checkpoint, "base_checkpoint", "chat_sft"):
        check_base_checkpoint(base_checkpoint)
        check_weights_whole(base_checkpoint, "base_checkpoint", "chat_sft")
        sft_run_config(config, checkpoint_run_config(base_checkpoint))
    check_save_to_apart(config.save_to, base_checkpoint, "base_checkpoint", "ChatConfig")
    return config


def rl_start(config: RLConfig, sft_checkpoint: str) -> RLConfig:
    """RL's config, validated and checked against the chat checkpoint it starts from: a chat checkpoint, a step's
    answers that split into SFT's micro-batches, save_to elsewhere. The workflows and `nanochat rl` check alike."""
    config = config.validate()
    with location_named(sft_checkpoint, "sft_checkpoint", "chat_rl"):
        check_sft_checkpoint(sft_checkpoint)
        check_weights_whole(sft_checkpoint, "sft_checkpoint", "chat_rl")
        rl_run_config(config, checkpoint_run_config(sft_checkpoint))
    check_save_to_apart(config.save_to, sft_checkpoint, "sft_checkpoint", "RLConfig")
    return config


def chat_stage(config: ChatConfig, base_checkpoint: str, resume_from: str = "", remote: bool = False
               ) -> tuple[ChatConfig, str]:
    """The SFT workflow's inputs (sft_start, stage_resume), then the world (probe_stage). Returns the config and the
    hub endpoint the data tasks use."""
    config = sft_start(config, base_checkpoint)
    continues = stage_resume(config, base_checkpoint, resume_from)
    return config, probe_stage(config, remote, continues)


def rl_stage(config: RLConfig, sft_checkpoint: str, resume_from: str = "", remote: bool = False
             ) -> tuple[RLConfig, str]:
    """The RL workflow's inputs (rl_start, stage_resume), then the world (probe_stage). Returns the config and the
    hub endpoint."""
    config = rl_start(config, sft_checkpoint)
    continues = stage_resume(config, sft_checkpoint, resume_from)
    return config, probe_stage(config, remote, continues)


def stage_resume(config: ChatConfig | RLConfig, start_checkpoint: str, resume_from: str,
                 field: str = "resume_from") -> str:
    """A chat stage's checkpoint to continue (`resume_from`, "" for none; `field` names it): one of the same stage,
    of the start checkpoint's model, trained on the same data. Read from its small files, before any download.
    Returns the name of the run it continues ("" for none)."""
    if not resume_from:
        return ""
    sft = isinstance(config, ChatConfig)
    stage = "chat_sft" if sft else "chat_rl"
    check_no_surrounding_space(resume_from, field, stage)
    with location_named(resume_from, field, stage):
        state = check_resumed_stage(resume_from, "chat" if sft else "rl", stage, field)
        check_chat_resume(resume_from, config, SFT_DATA_FIELDS if sft else RL_DATA_FIELDS, start_checkpoint,
                          "base_checkpoint" if sft else "sft_checkpoint", stage)
    return state["run_name"]


def probe_stage(config: ChatConfig | RLConfig, remote: bool = False, continues: str = "") -> str:
    """What a chat stage needs of the world: save_to writable (and free of other runs' checkpoints: continues names
    the run it resumes), the hub answering (and SFT's sources not too large for its epochs), and with humaneval on,
    a sandbox for model-written code on this machine (a front that checks elsewhere than on the kind of node that
    evaluates checks there too: describe_machine's sandbox_for). Returns the hub endpoint."""
    check_device_here(config, remote)
    check_save_to(config.save_to, type(config).__name__, remote, continues)
    if owner := sandbox_required_by(config):
        require_sandbox(owner)
    check_hub_endpoint(config)
    if isinstance(config, ChatConfig):
        check_mixture_fits(config)
    return hub_endpoint(config.hf_endpoint)


def check_device_here(config: RunConfig | ChatConfig | RLConfig, remote: bool) -> None:
    """A local run trains on this machine: a device it lacks (device: cuda on a laptop) is named now, before any
    download. (On a cluster the training node is another machine, whose task checks its own.)"""
    if remote:
        return
    try:
        select_device(config.device)
    except ConfigError as error:
        raise ConfigError("device", error.problem, type(config).__name__) from None


def sandbox_required_by(config: ChatConfig | RLConfig) -> str:
    """The name of the config whose chat evaluation must run model-written code in the sandbox (humaneval "on", and
    among its tasks), or "" where it need not."""
    return type(config).__name__ if config.humaneval == "on" and "humaneval" in config.eval_task_list else ""


def describe_machine(show: Show, *, printed: bool = True, sandbox_for: str = "") -> dict:
    """The environment report of this machine (the training node kind), on its card and, when `printed`, in the
    log. A local run's later stages leave it out of the log: the terminal has it from pretraining. With
    sandbox_for (sandbox_required_by's name), this node kind must run the sandbox first: it evaluates, hours on."""
    if sandbox_for:
        require_sandbox(sandbox_for)
    report = environment_report()
    if printed:
        print(format_report(report), flush=True)
    show("Environment", environment_deck_html(report))
    return report
