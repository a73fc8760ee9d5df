"""Named launch plans of `main`, registered with `pyflyte register workflows` (see docs/cluster.md).

    nanochat_d8_t4     the reference run: configs/d8_t4.yaml as its default input (editable at launch)
    nanochat_d8_t4_tuned  the same run with later nanochat recipe changes: configs/d8_t4_tuned.yaml
    nanochat_nightly   the reference run every night; e-mails on failure. Inactive until activated.
    nanochat_chat_d8_t4  the whole pipeline on T4s: the reference run, CORE, SFT (configs/chat_d8_t4.yaml), chat eval
    nanochat_rl_d8_t4  RL on GSM8K of a chat checkpoint on a T4 (configs/rl_d8_t4.yaml); sft_checkpoint is asked for
    nanochat_chat_rl_d8_t4  the whole pipeline, then RL: the three reference presets above

`main` also has its default launch plan (same name as the workflow), with RunConfig's defaults. The presets, the
nightly's cron and its alert e-mails are in workflows/presets.py, shared with the Flyte 2 front.
"""

from flytekit import CronSchedule, Email, LaunchPlan, WorkflowExecutionPhase

from workflows.chat import chat_rl, nanochat_chat, nanochat_chat_rl
from workflows.nanochat import main
from workflows.presets import (
    ALERT_EMAILS,
    NIGHTLY_CRON,
    REFERENCE_CHAT_CONFIG,
    REFERENCE_CONFIG,
    REFERENCE_RL_CONFIG,
    TUNED_CONFIG,
)

FAILED_PHASES = [WorkflowExecutionPhase.FAILED, WorkflowExecutionPhase.TIMED_OUT, WorkflowExecutionPhase.ABORTED]

nanochat_d8_t4 = LaunchPlan.get_or_create(
    main,
    name="nanochat_d8_t4",
    default_inputs={"config": REFERENCE_CONFIG},
)

nanochat_d8_t4_tuned = LaunchPlan.get_or_create(
    main,
    name="nanochat_d8_t4_tuned",
    default_inputs={"config": TUNED_CONFIG},
)

nanochat_nightly = LaunchPlan.get_or_create(
    main,
    name="nanochat_nightly",
    default_inputs={"config": REFERENCE_CONFIG},
    schedule=CronSchedule(schedule=NIGHTLY_CRON),
    notifications=[Email(phases=FAILED_PHASES, recipients_email=ALERT_EMAILS)] if ALERT_EMAILS else [],
)

nanochat_chat_d8_t4 = LaunchPlan.get_or_create(
    nanochat_chat,
    name="nanochat_chat_d8_t4",
    default_inputs={"config": REFERENCE_CONFIG, "chat_config": REFERENCE_CHAT_CONFIG},
)

nanochat_rl_d8_t4 = LaunchPlan.get_or_create(
    chat_rl,
    name="nanochat_rl_d8_t4",
    default_inputs={"config": REFERENCE_RL_CONFIG},  # sft_checkpoint: a chat run's chat_checkpoint, given at launch
)

nanochat_chat_rl_d8_t4 = LaunchPlan.get_or_create(
    nanochat_chat_rl,
    name="nanochat_chat_rl_d8_t4",
    default_inputs={"config": REFERENCE_CONFIG, "chat_config": REFERENCE_CHAT_CONFIG, "rl_config": REFERENCE_RL_CONFIG},
)
