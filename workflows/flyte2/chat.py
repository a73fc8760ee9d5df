"""The chat stages on Flyte 2, as workflows/chat.py: SFT of a base checkpoint, then the chat evaluation; RL on GSM8K
of an SFT checkpoint, then the chat evaluation; and the whole pipeline, from raw shards to an evaluated chat model,
with or without RL.

    flyte run workflows/flyte2/chat.py chat_sft --base_checkpoint s3://.../checkpoint --config configs/chat_d8_t4.yaml
    flyte run workflows/flyte2/chat.py chat_rl --sft_checkpoint s3://.../chat_checkpoint --config configs/rl_d8_t4.yaml
    flyte run --local workflows/flyte2/chat.py nanochat_chat --config configs/smoke.yaml \
        --chat_config configs/chat_smoke.yaml
    flyte run workflows/flyte2/chat.py nanochat_chat_rl --config ... --chat_config ... --rl_config configs/rl_smoke.yaml

The data tasks run on CPUs, cached, while the GPU node starts: a relaunch downloads nothing again. As in a flytekit
workflow, what need not wait runs at once on a cluster (support.concurrently): a pipeline's SFT starts as soon as
pretraining has trained, beside CORE, and its RL beside the SFT model's chat evaluation.
"""

import functools
from typing import NamedTuple

import flyte
from flyte.io import Dir

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from nanochat_flyte.pipeline import evaluate, prepare, setup, train
from nanochat_flyte.pipeline.finish import finish_chat_run
from workflows.flyte2.environments import CHAT_DATA_CACHE, EVALUATION_CACHE, data_env, driver_env, gpu_env
from workflows.flyte2.pretraining import describe_training_node, score_and_report, train_base
from workflows.flyte2.support import (
    FlyteAttempts,
    concurrently,
    is_local_run,
    local_dir,
    name_wandb_run,
    one_line_user_errors,
    retried_only_on_storage_errors,
    said_at_exit_while_running,
    show_report,
    upload,
    wandb_links,
    work_dir,
)
from workflows.presets import REFERENCE_CHAT_CONFIG, REFERENCE_CONFIG, REFERENCE_RL_CONFIG


# Keyed by exactly what decides the conversations: a new learning rate or a longer run reuses the prepared data.
@data_env.task(cache=CHAT_DATA_CACHE)
@one_line_user_errors
def prepare_chat_sft_data(endpoint: str, smoltalk_epochs: float, mmlu_epochs: float, gsm8k_epochs: float,
                          max_conversations: int, val_conversations: int, seed: int) -> Dir:
    """The SFT mixture (train.jsonl) and the held-out validation conversations (val.jsonl), from the hub."""
    return upload(prepare.chat_sft_data(
        endpoint, work_dir("sft_data"), smoltalk_epochs=smoltalk_epochs, mmlu_epochs=mmlu_epochs,
        gsm8k_epochs=gsm8k_epochs, max_conversations=max_conversations, val_conversations=val_conversations, seed=seed))


@data_env.task(cache=CHAT_DATA_CACHE)
@one_line_user_errors
def prepare_rl_problems(endpoint: str, max_problems: int, eval_problems: int, seed: int) -> Dir:
    """RL's GSM8K problems: train.jsonl (to learn from) and val.jsonl (the validation pass@1), from the hub."""
    return upload(prepare.rl_problems(endpoint, work_dir("rl_data"), max_problems=max_problems,
                                      eval_problems=eval_problems, seed=seed))


@data_env.task(cache=CHAT_DATA_CACHE)
@one_line_user_errors
def prepare_chat_eval_data(endpoint: str, tasks: str) -> Dir:
    """The evaluation sets (<task>.jsonl), so that the GPU task downloads nothing."""
    return upload(prepare.chat_eval_data(endpoint, tasks, work_dir("eval_data")))


def train_in_task(config: ChatConfig | RLConfig, start: Dir, data: Dir, environment: dict, resume_from: str,
                  directory: str) -> tuple[Dir, dict]:
    """A chat stage's training task: SFT or RL, continuing a preempted attempt's last save, or the stage's checkpoint
    resume_from."""
    name_wandb_run()
    checkpoint_dir = work_dir(directory)
    resume_line = functools.partial(train.stage_resume_command, config, checkpoint_dir,
                                    "flyte run --local workflows/flyte2/chat.py", start.path)
    with said_at_exit_while_running(resume_line):
        summary = train.chat_stage(config, local_dir(start), local_dir(data), checkpoint_dir, environment,
                                   resume_from, FlyteAttempts(), show_report)
    return upload(checkpoint_dir), summary


@gpu_env.task(retries=3, report=True, links=wandb_links("chat"))
@one_line_user_errors
@retried_only_on_storage_errors
def train_chat_model(config: ChatConfig, base_checkpoint: Dir, data: Dir, environment: dict, resume_from: str
                     ) -> tuple[Dir, dict]:
    """SFT on the shared training loop."""
    return train_in_task(config, base_checkpoint, data, environment, resume_from, "chat_checkpoint")


@gpu_env.task(retries=3, report=True, links=wandb_links("rl"))
@one_line_user_errors
@retried_only_on_storage_errors
def train_rl_model(config: RLConfig, sft_checkpoint: Dir, data: Dir, environment: dict, resume_from: str
                   ) -> tuple[Dir, dict]:
    """RL on the shared training loop."""
    return train_in_task(config, sft_checkpoint, data, environment, resume_from, "rl_checkpoint")


@gpu_env.task(retries=2, report=True, cache=EVALUATION_CACHE)
@one_line_user_errors
@retried_only_on_storage_errors
def evaluate_chat_model(config: ChatConfig, checkpoint: Dir, eval_data: Dir, tasks: str, max_per_task: int,
                        max_tokens: int, humaneval: str) -> dict:
    """The chat evaluation and ChatCORE. Every setting that changes the scores is an input of its own
    (evaluate.chat_settings: the cache key); `config` brings the rest."""
    return evaluate.chat_model(config, checkpoint.path, local_dir(eval_data), tasks, max_per_task, max_tokens,
                               humaneval, show_report)


class ChatOutputs(NamedTuple):
    chat_checkpoint: Dir  # the chat checkpoint directory: same layout as a base one, "phase": "chat"
    results: dict  # the chat results JSON: SFT summary and chat evaluation
    report: Dir  # report.md with its plots and the chat evaluation table, and results.json


class RLOutputs(NamedTuple):
    rl_checkpoint: Dir  # the RL checkpoint: a chat checkpoint ("phase": "chat", "stage": "rl")
    results: dict  # the RL results JSON: RL summary and chat evaluation
    report: Dir  # report.md with its plots and the chat evaluation table, and results.json


class TrainedChat(NamedTuple):
    """What a chat stage's first half (train_sft, train_rl) hands to its second (evaluate_and_report)."""

    config: ChatConfig | RLConfig  # as the stage's checks returned it
    start_checkpoint: Dir
    environment: dict
    eval_data: Dir
    checkpoint: Dir
    training: dict


async def train_sft(config: ChatConfig, base_checkpoint: Dir, resume_from: str = "") -> TrainedChat:
    """checks (in the driver; the sandbox on the GPU node kind) -> the training node described and the data (CPU,
    cached), at once -> SFT."""
    config, endpoint = setup.chat_stage(config, base_checkpoint.path, resume_from, remote=not is_local_run())
    environment, data, eval_data = await concurrently(
        describe_training_node.aio(printed=not is_local_run(),  # locally, pretraining printed it
                                   sandbox_for=setup.sandbox_required_by(config)),
        prepare_chat_sft_data.aio(endpoint, **prepare.sft_data_settings(config)),
        prepare_chat_eval_data.aio(endpoint, config.eval_tasks))
    chat_checkpoint, training = await train_chat_model.aio(config, base_checkpoint, data, environment, resume_from)
    return TrainedChat(config, base_checkpoint, environment, eval_data, chat_checkpoint, training)


async def train_rl(config: RLConfig, sft_checkpoint: Dir, resume_from: str = "") -> TrainedChat:
    """checks (in the driver; the sandbox on the GPU node kind) -> the training node described, GSM8K problems and
    evaluation data (CPU, cached), at once -> RL."""
    config, endpoint = setup.rl_stage(config, sft_checkpoint.path, resume_from, remote=not is_local_run())
    environment, data, eval_data = await concurrently(
        describe_training_node.aio(printed=not is_local_run(), sandbox_for=setup.sandbox_required_by(config)),
        prepare_rl_problems.aio(endpoint, **prepare.rl_data_settings(config)),
        prepare_chat_eval_data.aio(endpoint, config.eval_tasks))
    rl_checkpoint, training = await train_rl_model.aio(config, sft_checkpoint, data, environment, resume_from)
    return TrainedChat(config, sft_checkpoint, environment, eval_data, rl_checkpoint, training)


async def evaluate_and_report(trained: TrainedChat) -> tuple[dict, Dir]:
    """The chat evaluation, then the results JSON of SFT or RL and the run's report card with its table."""
    config = trained.config
    evaluation = await evaluate_chat_model.aio(config.chat_eval_config(), trained.checkpoint, trained.eval_data,
                                               **evaluate.chat_settings(config))
    report_dir = work_dir("chat_report")
    results = finish_chat_run(config, trained.start_checkpoint.path, trained.training, evaluation,
                              trained.environment, trained.checkpoint.path, report_dir, local=is_local_run())
    return results, upload(report_dir)


async def fine_tune(config: ChatConfig, base_checkpoint: Dir, resume_from: str = "") -> ChatOutputs:
    trained = await train_sft(config, base_checkpoint, resume_from)
    return ChatOutputs(trained.checkpoint, *await evaluate_and_report(trained))


async def reinforce(config: RLConfig, sft_checkpoint: Dir, resume_from: str = "") -> RLOutputs:
    trained = await train_rl(config, sft_checkpoint, resume_from)
    return RLOutputs(trained.checkpoint, *await evaluate_and_report(trained))


class PipelineOutputs(NamedTuple):
    results: dict  # the base run's results JSON (with CORE)
    checkpoint: Dir  # the base checkpoint
    report: Dir  # the base run's report card
    chat_results: dict  # the chat stage's results JSON
    chat_checkpoint: Dir  # the chat checkpoint
    chat_report: Dir  # the chat run's report card


class RLPipelineOutputs(NamedTuple):
    results: dict  # the base run's results JSON (with CORE)
    checkpoint: Dir  # the base checkpoint
    report: Dir  # the base run's report card
    chat_results: dict  # the SFT stage's results JSON
    chat_checkpoint: Dir  # the SFT checkpoint
    chat_report: Dir  # the SFT run's report card
    rl_results: dict  # the RL stage's results JSON
    rl_checkpoint: Dir  # the RL checkpoint: a chat checkpoint, the one to talk to
    rl_report: Dir  # the RL run's report card


# The presets, as workflows/launch_plans.py's: fired from the console, with their inputs editable.
CHAT_D8_T4 = flyte.Trigger("nanochat-chat-d8-t4", inputs={"config": REFERENCE_CONFIG,
                                                          "chat_config": REFERENCE_CHAT_CONFIG},
                           description="the whole pipeline on T4s: the reference run, CORE, SFT, chat evaluation")
CHAT_RL_D8_T4 = flyte.Trigger("nanochat-chat-rl-d8-t4", inputs={"config": REFERENCE_CONFIG,
                                                                "chat_config": REFERENCE_CHAT_CONFIG,
                                                                "rl_config": REFERENCE_RL_CONFIG},
                              description="the whole pipeline, then RL: the three reference presets")
RL_D8_T4 = flyte.Trigger("nanochat-rl-d8-t4", inputs={"config": REFERENCE_RL_CONFIG, "resume_from": ""},
                         description="RL on GSM8K of a chat checkpoint on a T4: sft_checkpoint is asked for")


@driver_env.task
@one_line_user_errors
async def chat_sft(base_checkpoint: Dir, config: ChatConfig = ChatConfig(), resume_from: str = "") -> ChatOutputs:
    """A base checkpoint to an evaluated chat checkpoint: SFT, then the chat evaluation.

    Args:
        base_checkpoint: a base checkpoint (a run's `checkpoint` output, or a directory or URI holding one).
        config: the chat stage's settings (ChatConfig: a preset's values); a relaunch may edit any field.
        resume_from: a chat checkpoint of an SFT run of the same base checkpoint and data, to continue from its
            last save. Empty: a new run.
    """
    return await fine_tune(config, base_checkpoint, resume_from)


@driver_env.task(triggers=RL_D8_T4)
@one_line_user_errors
async def chat_rl(sft_checkpoint: Dir, config: RLConfig = RLConfig(), resume_from: str = "") -> RLOutputs:
    """A chat (SFT) checkpoint to an evaluated RL checkpoint: RL on GSM8K, then the chat evaluation.

    Args:
        sft_checkpoint: a chat checkpoint (a chat run's `chat_checkpoint` output, or a directory or URI holding
            one).
        config: RL's settings (RLConfig: a preset's values); a relaunch may edit any field.
        resume_from: an RL checkpoint of a run from the same SFT checkpoint and problems, to continue from its last
            save. Empty: a new run.
    """
    return await reinforce(config, sft_checkpoint, resume_from)


@driver_env.task(triggers=CHAT_D8_T4)
@one_line_user_errors
async def nanochat_chat(config: RunConfig = RunConfig(), chat_config: ChatConfig = ChatConfig(),
                        resume_from: str = "") -> PipelineOutputs:
    """The whole pipeline: pretraining (with CORE when config.evaluate_core), then SFT and the chat evaluation.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        chat_config: the chat stage's settings (ChatConfig: a preset's values).
        resume_from: as main's: the pretraining checkpoint to continue. Empty: a new run.
    """
    # before pretraining: hours before SFT's own checks
    chat_config, _ = setup.later_stages(config, chat_config, resume_from=resume_from, remote=not is_local_run())
    trained = await train_base(config, resume_from, entry="nanochat_chat")
    base, chat = await concurrently(score_and_report(trained), fine_tune(chat_config, trained.checkpoint))
    return PipelineOutputs(base.results, base.checkpoint, base.report, chat.results, chat.chat_checkpoint,
                           chat.report)


@driver_env.task(triggers=CHAT_RL_D8_T4)
@one_line_user_errors
async def nanochat_chat_rl(config: RunConfig = RunConfig(), chat_config: ChatConfig = ChatConfig(),
                           rl_config: RLConfig = RLConfig(), resume_from: str = "") -> RLPipelineOutputs:
    """The reference run's next steps: pretraining (with CORE when config.evaluate_core), SFT and its chat
    evaluation, then RL on GSM8K and the chat evaluation of the RL model.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        chat_config: the chat stage's settings (ChatConfig: a preset's values).
        rl_config: RL's settings (RLConfig: a preset's values).
        resume_from: as main's: the pretraining checkpoint to continue. Empty: a new run.
    """
    chat_config, rl_config = setup.later_stages(config, chat_config, rl_config, resume_from,
                                                remote=not is_local_run())
    trained = await train_base(config, resume_from, entry="nanochat_chat_rl")

    async def chat_then_rl() -> tuple[ChatOutputs, RLOutputs]:
        sft = await train_sft(chat_config, trained.checkpoint)
        (chat_results, chat_report), rl = await concurrently(evaluate_and_report(sft),
                                                             reinforce(rl_config, sft.checkpoint))
        return ChatOutputs(sft.checkpoint, chat_results, chat_report), rl

    base, (chat, rl) = await concurrently(score_and_report(trained), chat_then_rl())
    return RLPipelineOutputs(base.results, base.checkpoint, base.report, chat.results, chat.chat_checkpoint,
                             chat.report, rl.results, rl.rl_checkpoint, rl.report)
