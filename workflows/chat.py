"""The chat stages as Flyte workflows: supervised fine-tuning (SFT) of a base checkpoint, then the chat evaluation;
reinforcement learning (RL) on GSM8K of an SFT checkpoint, then the chat evaluation; and the whole pipeline, from
raw shards to an evaluated chat model, with or without RL.

    pyflyte run workflows/chat.py chat_sft --base_checkpoint s3://.../checkpoint --config configs/chat_d8_t4.yaml
    pyflyte run workflows/chat.py chat_rl --sft_checkpoint s3://.../chat_checkpoint --config configs/rl_d8_t4.yaml
    pyflyte run workflows/chat.py nanochat_chat --config configs/smoke.yaml --chat_config configs/chat_smoke.yaml
    pyflyte run workflows/chat.py nanochat_chat_rl --config ... --chat_config ... --rl_config configs/rl_smoke.yaml

Like workflows/nanochat.py this file only declares tasks, resources and caching; the work is in nanochat_flyte
(data/chat_data.py, training/sft.py and rl.py, evaluation/chat_eval.py, through pipeline/). The data tasks run on
CPUs, cached, before any GPU starts: a relaunch downloads nothing again.
"""

from pathlib import Path
from typing import NamedTuple

from flytekit import Cache, current_context, task, workflow
from flytekit.types.directory import FlyteDirectory

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.pipeline import evaluate, prepare, secrets, setup, train
from nanochat_flyte.pipeline.finish import finish_chat_run
from workflows.image import IMAGE
from workflows.nanochat import RunOutputs, describe_training_node, pretrain
from workflows.support import (
    DATA_RESOURCES,
    DRIVER_RESOURCES,
    HF_SECRET,
    TRAINING_RESOURCES,
    TRAINING_TASK,
    WANDB_SECRET,
    FlytekitAttempts,
    checkpoint_location,
    deck,
    export_secret,
    is_local_run,
    one_line_user_errors,
    retried_on_storage_errors,
    wandb_console_link,
    with_secrets,
)

CHAT_DATA_CACHE_VERSION = prepare.CHAT_DATA_VERSION  # cached conversations of an older format are ignored


# A pipeline's chat and RL configs are checked against the base run before it starts: `pyflyte run` checks each config
# alone, a relaunch from the console with edited inputs checks nothing, and the stage's own setup runs hours later.
# With the HF token: they probe the hub, which a gated or private mirror answers only with it.
@task(container_image=IMAGE, **with_secrets(HF_SECRET), **DRIVER_RESOURCES)
@one_line_user_errors
def check_chat_config(config: RunConfig, chat_config: ChatConfig, resume_from: str) -> ChatConfig:
    export_secret(secrets.HF)
    return setup.later_stages(config, chat_config, resume_from=resume_from, remote=not is_local_run())[0]


@task(container_image=IMAGE, **with_secrets(HF_SECRET), **DRIVER_RESOURCES)
@one_line_user_errors
def check_chat_and_rl_configs(config: RunConfig, chat_config: ChatConfig, rl_config: RLConfig, resume_from: str
                              ) -> tuple[ChatConfig, RLConfig]:
    export_secret(secrets.HF)
    return setup.later_stages(config, chat_config, rl_config, resume_from, remote=not is_local_run())


# Each stage's inputs are checked on a CPU pod: a bad one fails in one line before any GPU node is asked for. The
# training node kind then checks the sandbox where the evaluation will run (describe_training_node).
@task(container_image=IMAGE, **with_secrets(HF_SECRET), **DRIVER_RESOURCES)
@one_line_user_errors
def check_chat_stage(config: ChatConfig, base_checkpoint: FlyteDirectory, resume_from: str
                     ) -> tuple[ChatConfig, str, str]:
    """Validate the chat config, check the base checkpoint (and the chat checkpoint to continue) and probe the hub
    endpoint. Returns the config, the endpoint the data tasks use, and the config name whose evaluation needs the
    sandbox (or "")."""
    export_secret(secrets.HF)
    config, endpoint = setup.chat_stage(config, checkpoint_location(base_checkpoint), resume_from,
                                        remote=not is_local_run())
    return config, endpoint, setup.sandbox_required_by(config)


@task(container_image=IMAGE, **with_secrets(HF_SECRET), **DRIVER_RESOURCES)
@one_line_user_errors
def check_rl_stage(config: RLConfig, sft_checkpoint: FlyteDirectory, resume_from: str
                   ) -> tuple[RLConfig, ChatConfig, str, str]:
    """Validate the RL config, check that the checkpoint is a chat (SFT) one (and the RL checkpoint to continue) and
    probe the hub endpoint. Returns the config, the ChatConfig of the evaluation after RL, the endpoint, and the
    config name whose evaluation needs the sandbox (or "")."""
    export_secret(secrets.HF)
    config, endpoint = setup.rl_stage(config, checkpoint_location(sft_checkpoint), resume_from,
                                      remote=not is_local_run())
    return config, config.chat_eval_config(), endpoint, setup.sandbox_required_by(config)


# Keyed by exactly what decides the conversations: a new learning rate or a longer run reuses the prepared data.
@task(container_image=IMAGE, **with_secrets(HF_SECRET), cache=Cache(version=CHAT_DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def prepare_chat_sft_data(endpoint: str, smoltalk_epochs: float, mmlu_epochs: float, gsm8k_epochs: float,
                          max_conversations: int, val_conversations: int, seed: int) -> FlyteDirectory:
    """The SFT mixture (train.jsonl) and the held-out validation conversations (val.jsonl), from the hub."""
    export_secret(secrets.HF)
    out_dir = Path(current_context().working_directory) / "sft_data"
    return FlyteDirectory(str(prepare.chat_sft_data(
        endpoint, out_dir, smoltalk_epochs=smoltalk_epochs, mmlu_epochs=mmlu_epochs, gsm8k_epochs=gsm8k_epochs,
        max_conversations=max_conversations, val_conversations=val_conversations, seed=seed)))


@task(container_image=IMAGE, **with_secrets(HF_SECRET), cache=Cache(version=CHAT_DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def prepare_rl_problems(endpoint: str, max_problems: int, eval_problems: int, seed: int) -> FlyteDirectory:
    """RL's GSM8K problems: train.jsonl (to learn from) and val.jsonl (the validation pass@1), from the hub."""
    export_secret(secrets.HF)
    out_dir = Path(current_context().working_directory) / "rl_data"
    return FlyteDirectory(str(prepare.rl_problems(endpoint, out_dir, max_problems=max_problems,
                                                  eval_problems=eval_problems, seed=seed)))


@task(container_image=IMAGE, **with_secrets(HF_SECRET), cache=Cache(version=CHAT_DATA_CACHE_VERSION),
      **DATA_RESOURCES)
@one_line_user_errors
def prepare_chat_eval_data(endpoint: str, tasks: str) -> FlyteDirectory:
    """The evaluation sets (<task>.jsonl), so that the GPU pod downloads nothing."""
    export_secret(secrets.HF)
    out_dir = Path(current_context().working_directory) / "eval_data"
    return FlyteDirectory(str(prepare.chat_eval_data(endpoint, tasks, out_dir)))


def train_in_task(config: ChatConfig | RLConfig, start: FlyteDirectory, data: FlyteDirectory, environment: dict,
                  resume_from: str, directory: str) -> tuple[FlyteDirectory, dict]:
    """A chat stage's training task: SFT or RL into the task's working directory, continuing a preempted attempt's
    intra-task checkpoint, or the stage's checkpoint resume_from."""
    export_secret(secrets.WANDB)
    checkpoint_dir = Path(current_context().working_directory) / directory
    try:
        with retried_on_storage_errors():
            summary = train.chat_stage(config, Path(start.download()), Path(data.download()), checkpoint_dir,
                                       environment, resume_from, FlytekitAttempts(), deck)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C in a local run (flytekit raises SystemExit): say how to go on
        if line := train.stage_resume_command(config, checkpoint_dir, "pyflyte run workflows/chat.py",
                                              checkpoint_location(start)):
            print(line, flush=True)
        raise
    return FlyteDirectory(str(checkpoint_dir)), summary


@task(**TRAINING_TASK)
@wandb_console_link(stage="chat")  # the Tracker's run id for SFT: <execution>-chat
@one_line_user_errors
def train_chat_model(config: ChatConfig, base_checkpoint: FlyteDirectory, data: FlyteDirectory, environment: dict,
                     resume_from: str) -> tuple[FlyteDirectory, dict]:
    """SFT on the shared training loop."""
    return train_in_task(config, base_checkpoint, data, environment, resume_from, "chat_checkpoint")


@task(**TRAINING_TASK)
@wandb_console_link(stage="rl")
@one_line_user_errors
def train_rl_model(config: RLConfig, sft_checkpoint: FlyteDirectory, data: FlyteDirectory, environment: dict,
                   resume_from: str) -> tuple[FlyteDirectory, dict]:
    """RL on the shared training loop."""
    return train_in_task(config, sft_checkpoint, data, environment, resume_from, "rl_checkpoint")


# Cached on (checkpoint, evaluation data, the settings that change the scores): evaluating the same checkpoint again
# costs nothing.
@task(container_image=IMAGE, **with_secrets(WANDB_SECRET), interruptible=True, retries=2, enable_deck=True,
      cache=Cache(version=evaluate.EVALUATION_VERSION, ignored_inputs=("config",)), **TRAINING_RESOURCES)
@one_line_user_errors
def evaluate_chat_model(config: ChatConfig, checkpoint: FlyteDirectory, eval_data: FlyteDirectory, tasks: str,
                        max_per_task: int, max_tokens: int, humaneval: str) -> dict:
    """ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval (in the sandbox, where it works), and ChatCORE. Every
    setting that changes the scores is an input of its own (the cache key); `config` brings the rest."""
    export_secret(secrets.WANDB)
    with retried_on_storage_errors():
        return evaluate.chat_model(config, checkpoint_location(checkpoint), Path(eval_data.download()), tasks,
                                   max_per_task, max_tokens, humaneval, deck)


def write_chat_results(config: ChatConfig | RLConfig, start_checkpoint: FlyteDirectory, training: dict,
                       evaluation: dict, checkpoint: FlyteDirectory, environment: dict) -> tuple[dict, FlyteDirectory]:
    """The results JSON of SFT or RL, and the run's report card with the chat evaluation table."""
    report_dir = Path(current_context().working_directory) / "chat_report"
    results = finish_chat_run(config, checkpoint_location(start_checkpoint), training, evaluation, environment,
                              checkpoint_location(checkpoint), report_dir, local=is_local_run())
    return results, FlyteDirectory(str(report_dir))


@task(container_image=IMAGE, **with_secrets(), **DRIVER_RESOURCES)
@one_line_user_errors
def aggregate_chat_results(config: ChatConfig, base_checkpoint: FlyteDirectory, training: dict, evaluation: dict,
                           checkpoint: FlyteDirectory, environment: dict) -> tuple[dict, FlyteDirectory]:
    """The chat results JSON (`sft`, `chat_eval`, `chatcore`), and the chat run's report card."""
    return write_chat_results(config, base_checkpoint, training, evaluation, checkpoint, environment)


@task(container_image=IMAGE, **with_secrets(), **DRIVER_RESOURCES)
@one_line_user_errors
def aggregate_rl_results(config: RLConfig, sft_checkpoint: FlyteDirectory, training: dict, evaluation: dict,
                         checkpoint: FlyteDirectory, environment: dict) -> tuple[dict, FlyteDirectory]:
    """The RL results JSON (`rl`, `chat_eval`, `chatcore`), and the RL run's report card."""
    return write_chat_results(config, sft_checkpoint, training, evaluation, checkpoint, environment)


class ChatOutputs(NamedTuple):
    chat_checkpoint: FlyteDirectory  # the chat checkpoint directory: same layout as a base one, "phase": "chat"
    results: dict  # the chat results JSON: SFT summary and chat evaluation
    report: FlyteDirectory  # report.md with its plots and the chat evaluation table, and results.json


class RLOutputs(NamedTuple):
    rl_checkpoint: FlyteDirectory  # the RL checkpoint: a chat checkpoint ("phase": "chat", "stage": "rl")
    results: dict  # the RL results JSON: RL summary and chat evaluation
    report: FlyteDirectory  # report.md with its plots and the chat evaluation table, and results.json


def fine_tune(config: ChatConfig, base_checkpoint: FlyteDirectory, resume_from: str = "") -> ChatOutputs:
    """checks (CPU; the sandbox on the GPU node kind) -> data (CPU, cached) -> SFT -> chat evaluation -> results."""
    checked, endpoint, sandbox_for = check_chat_stage(config=config, base_checkpoint=base_checkpoint,
                                                      resume_from=resume_from)
    environment = describe_training_node(sandbox_for=sandbox_for, later_stage=True)
    data = prepare_chat_sft_data(endpoint=endpoint, **prepare.sft_data_settings(checked))
    eval_data = prepare_chat_eval_data(endpoint=endpoint, tasks=checked.eval_tasks)
    chat_checkpoint, training = train_chat_model(config=checked, base_checkpoint=base_checkpoint, data=data,
                                                 environment=environment, resume_from=resume_from)
    evaluation = evaluate_chat_model(config=checked, checkpoint=chat_checkpoint, eval_data=eval_data,
                                     **evaluate.chat_settings(checked))
    results, report = aggregate_chat_results(config=checked, base_checkpoint=base_checkpoint, training=training,
                                             evaluation=evaluation, checkpoint=chat_checkpoint, environment=environment)
    return ChatOutputs(chat_checkpoint, results, report)


@workflow
def chat_sft(base_checkpoint: FlyteDirectory, config: ChatConfig = ChatConfig(), resume_from: str = ""
             ) -> ChatOutputs:
    """A base checkpoint to an evaluated chat checkpoint: SFT, then the chat evaluation.

    Args:
        base_checkpoint: a base checkpoint (a run's `checkpoint` output, or a directory or URI holding one).
        config: the chat stage's settings (ChatConfig: a preset's values); a relaunch may edit any field.
        resume_from: a chat checkpoint of an SFT run of the same base checkpoint and data, to continue from its
            last save. Empty: a new run.
    """
    return fine_tune(config, base_checkpoint, resume_from)


def reinforce(config: RLConfig, sft_checkpoint: FlyteDirectory, resume_from: str = "") -> RLOutputs:
    """checks (CPU; the sandbox on the GPU node kind) -> GSM8K problems and evaluation data (CPU, cached) -> RL ->
    chat evaluation -> results."""
    checked, eval_config, endpoint, sandbox_for = check_rl_stage(config=config, sft_checkpoint=sft_checkpoint,
                                                                 resume_from=resume_from)
    environment = describe_training_node(sandbox_for=sandbox_for, later_stage=True)
    data = prepare_rl_problems(endpoint=endpoint, **prepare.rl_data_settings(checked))
    eval_data = prepare_chat_eval_data(endpoint=endpoint, tasks=checked.eval_tasks)
    rl_checkpoint, training = train_rl_model(config=checked, sft_checkpoint=sft_checkpoint, data=data,
                                             environment=environment, resume_from=resume_from)
    evaluation = evaluate_chat_model(config=eval_config, checkpoint=rl_checkpoint, eval_data=eval_data,
                                     **evaluate.chat_settings(checked))
    results, report = aggregate_rl_results(config=checked, sft_checkpoint=sft_checkpoint, training=training,
                                           evaluation=evaluation, checkpoint=rl_checkpoint, environment=environment)
    return RLOutputs(rl_checkpoint, results, report)


@workflow
def chat_rl(sft_checkpoint: FlyteDirectory, config: RLConfig = RLConfig(), resume_from: str = "") -> RLOutputs:
    """A chat (SFT) checkpoint to an evaluated RL checkpoint: RL on GSM8K, then the chat evaluation.

    Args:
        sft_checkpoint: a chat checkpoint (a chat run's `chat_checkpoint` output, or a directory or URI holding
            one).
        config: RL's settings (RLConfig: a preset's values); a relaunch may edit any field.
        resume_from: an RL checkpoint of a run from the same SFT checkpoint and problems, to continue from its last
            save. Empty: a new run.
    """
    return reinforce(config, sft_checkpoint, resume_from)


class PipelineOutputs(NamedTuple):
    results: dict  # the base run's results JSON (with CORE)
    checkpoint: FlyteDirectory  # the base checkpoint
    report: FlyteDirectory  # the base run's report card
    chat_results: dict  # the chat stage's results JSON
    chat_checkpoint: FlyteDirectory  # the chat checkpoint
    chat_report: FlyteDirectory  # the chat run's report card


@workflow
def nanochat_chat(config: RunConfig = RunConfig(), chat_config: ChatConfig = ChatConfig(), resume_from: str = ""
                  ) -> PipelineOutputs:
    """The whole pipeline: pretraining (with CORE when config.evaluate_core), then SFT and the chat evaluation.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        chat_config: the chat stage's settings (ChatConfig: a preset's values).
        resume_from: as main's: the pretraining checkpoint to continue. Empty: a new run.
    """
    checked_chat = check_chat_config(config=config, chat_config=chat_config, resume_from=resume_from)
    base: RunOutputs = pretrain(config, resume_from, checked_first=checked_chat, entry="nanochat_chat")
    chat = fine_tune(checked_chat, base.checkpoint)
    return PipelineOutputs(base.results, base.checkpoint, base.report, chat.results, chat.chat_checkpoint,
                           chat.report)


class RLPipelineOutputs(NamedTuple):
    results: dict  # the base run's results JSON (with CORE)
    checkpoint: FlyteDirectory  # the base checkpoint
    report: FlyteDirectory  # the base run's report card
    chat_results: dict  # the SFT stage's results JSON
    chat_checkpoint: FlyteDirectory  # the SFT checkpoint
    chat_report: FlyteDirectory  # the SFT run's report card
    rl_results: dict  # the RL stage's results JSON
    rl_checkpoint: FlyteDirectory  # the RL checkpoint: a chat checkpoint, the one to talk to
    rl_report: FlyteDirectory  # the RL run's report card


@workflow
def nanochat_chat_rl(config: RunConfig = RunConfig(), chat_config: ChatConfig = ChatConfig(),
                     rl_config: RLConfig = RLConfig(), resume_from: str = "") -> RLPipelineOutputs:
    """The reference run's next steps: pretraining (with CORE when config.evaluate_core), SFT and its chat
    evaluation, then RL on GSM8K and the chat evaluation of the RL model.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        chat_config: the chat stage's settings (ChatConfig: a preset's values).
        rl_config: RL's settings (RLConfig: a preset's values).
        resume_from: as main's: the pretraining checkpoint to continue. Empty: a new run.
    """
    # one node checks both later configs; pretraining waits for it
    checked_chat, checked_rl = check_chat_and_rl_configs(config=config, chat_config=chat_config, rl_config=rl_config,
                                                         resume_from=resume_from)
    base: RunOutputs = pretrain(config, resume_from, checked_first=checked_chat, entry="nanochat_chat_rl")
    chat = fine_tune(checked_chat, base.checkpoint)
    rl = reinforce(checked_rl, chat.chat_checkpoint)
    return RLPipelineOutputs(base.results, base.checkpoint, base.report, chat.results, chat.chat_checkpoint,
                             chat.report, rl.results, rl.rl_checkpoint, rl.report)
