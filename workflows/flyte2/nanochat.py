"""nanochat pretraining on Flyte 2: FineWeb-Edu shards -> tokens -> trained GPT -> results, as workflows/nanochat.py.

    flyte run --local workflows/flyte2/nanochat.py main --config configs/smoke.yaml     # locally, on a laptop
    flyte run workflows/flyte2/nanochat.py main --config configs/d8_t4.yaml             # on a cluster
    flyte deploy workflows/flyte2/nanochat.py driver_env                                # the tasks and triggers

The triggers are workflows/launch_plans.py's: the presets, fired from the console with their inputs editable, and
the nightly (inactive until activated).
"""

import flyte
import flyte.notify
from flyte.models import ActionPhase

from nanochat_flyte.config import RunConfig
from workflows.flyte2.environments import driver_env
from workflows.flyte2.pretraining import RunOutputs, pretrain
from workflows.flyte2.support import one_line_user_errors
from workflows.presets import ALERT_EMAILS, NIGHTLY_CRON, REFERENCE_CONFIG, TUNED_CONFIG

FAILED = (ActionPhase.FAILED, ActionPhase.TIMED_OUT, ActionPhase.ABORTED)

NIGHTLY = flyte.Trigger(
    "nanochat-nightly", flyte.Cron(NIGHTLY_CRON), inputs={"config": REFERENCE_CONFIG, "resume_from": ""},
    auto_activate=False,  # as v1's scheduled launch plan: inactive until activated
    notifications=flyte.notify.Email(on_phase=FAILED, recipients=tuple(ALERT_EMAILS)) if ALERT_EMAILS else None)
D8_T4 = flyte.Trigger("nanochat-d8-t4", inputs={"config": REFERENCE_CONFIG, "resume_from": ""},
                      description="the reference run: configs/d8_t4.yaml")
D8_T4_TUNED = flyte.Trigger("nanochat-d8-t4-tuned", inputs={"config": TUNED_CONFIG, "resume_from": ""},
                            description="the reference run with later nanochat recipe changes: d8_t4_tuned.yaml")


@driver_env.task(triggers=(NIGHTLY, D8_T4, D8_T4_TUNED))
@one_line_user_errors
async def main(config: RunConfig = RunConfig(), resume_from: str = "") -> RunOutputs:
    """The whole run: data, pretraining, CORE, the results JSON, the checkpoint and the report card.

    Args:
        config: the run's settings (RunConfig: a preset's values); a relaunch may edit any field.
        resume_from: a checkpoint directory or URI to continue (a run's `checkpoint` output or its save_to copy): a
            run that stopped goes on from its last save, a finished one is extended to a larger num_iterations
            (with that length's LR schedule). Empty: a new run.
    """
    return await pretrain(config, resume_from)
