"""The chat server as a Flyte 2 app: `nanochat serve` on a chat checkpoint, on a T4, behind its API key, scaled to
zero when idle.

    NANOCHAT_CHAT_CHECKPOINT=s3://.../chat_checkpoint flyte deploy workflows/flyte2/serve.py chat_app

NANOCHAT_CHAT_CHECKPOINT, read at deployment: a chat run's `chat_checkpoint` (or `rl_checkpoint`) output. The app
mounts it, and the server answers requests that bear the API key (the secret nanochat_api_key, flyte create secret).
"""

import os
from datetime import timedelta

import flyte
import flyte.app
from flyte.io import Dir

from nanochat_flyte.inference.serve import model_name_of
from workflows.flyte2.environments import CHAT_API_KEY_SECRET, IMAGE, PRESETS

CHAT_CHECKPOINT = os.environ.get("NANOCHAT_CHAT_CHECKPOINT", "")  # none: `flyte deploy` says the app needs one
CHECKPOINT_MOUNT = "/mnt/checkpoint"
PORT = 8000

# Inference of a small model: the T4 of the training, fewer CPUs and less memory than training.
SERVING_NODE = flyte.Resources(cpu=4, memory="16Gi", gpu="T4:1")

chat_app = flyte.app.AppEnvironment(
    name="nanochat-chat",
    image=IMAGE,
    resources=SERVING_NODE,
    port=PORT,
    # --require-api-key: the platform's own authentication is off, so a missing key must stop the server, not open it
    args=["nanochat", "serve", "--checkpoint", CHECKPOINT_MOUNT, "--host", "0.0.0.0", "--port", str(PORT),
          "--require-api-key", "--model-name", model_name_of(CHAT_CHECKPOINT)],
    parameters=[flyte.app.Parameter(name="checkpoint", value=Dir(path=CHAT_CHECKPOINT) if CHAT_CHECKPOINT else None,
                                    mount=CHECKPOINT_MOUNT)],
    secrets=[CHAT_API_KEY_SECRET],  # NANOCHAT_API_KEY: every /v1 request needs it as a bearer token
    requires_auth=False,  # the server checks its own API key, so OpenAI clients can call it
    scaling=flyte.app.Scaling(replicas=(0, 1), scaledown_after=timedelta(minutes=15)),  # to zero when idle
    include=PRESETS,  # the server process imports this file again to find the app, and with it the presets
)
