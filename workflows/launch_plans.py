"""Named launch plans of `main`, registered with `pyflyte register workflows` (see docs/cluster.md).

    nanochat_d8_t4     the reference run: configs/d8_t4.yaml as its default input (editable at launch)
    nanochat_d8_t4_tuned  the same run with later nanochat recipe changes: configs/d8_t4_tuned.yaml
    nanochat_nightly   the reference run every night; e-mails on failure. Inactive until activated.
    nanochat_chat_d8_t4  the whole pipeline on T4s: the reference run, CORE, SFT (configs/chat_d8_t4.yaml), chat eval
    nanochat_rl_d8_t4  RL on GSM8K of a chat checkpoint on a T4 (configs/rl_d8_t4.yaml); sft_checkpoint is asked for
    nanochat_chat_rl_d8_t4  the whole pipeline, then RL: the three reference presets above

`main` also has its default launch plan (same name as the workflow), with RunConfig's defaults.
Settings read at registration time: NANOCHAT_NIGHTLY_CRON (default "0 3 * * *", UTC) and
NANOCHAT_ALERT_EMAILS (comma-separated; empty: no e-mail, failures show in the console only).
"""

import os
from pathlib import Path

from flytekit import CronSchedule, Email, LaunchPlan, WorkflowExecutionPhase

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig
from workflows.chat import chat_rl, nanochat_chat, nanochat_chat_rl
from workflows.nanochat import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCE_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4.yaml")
TUNED_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4_tuned.yaml")
REFERENCE_CHAT_CONFIG = ChatConfig.from_file(CONFIGS / "chat_d8_t4.yaml")
REFERENCE_RL_CONFIG = RLConfig.from_file(CONFIGS / "rl_d8_t4.yaml")
NIGHTLY_CRON = os.environ.get("NANOCHAT_NIGHTLY_CRON", "0 3 * * *")
ALERT_EMAILS = [address.strip() for address in os.environ.get("NANOCHAT_ALERT_EMAILS", "").split(",")
                if address.strip()]
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
