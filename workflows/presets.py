"""The presets both Flyte fronts launch by name, and the nightly schedule: read at registration time.

Settings: NANOCHAT_NIGHTLY_CRON (default "0 3 * * *", UTC) and NANOCHAT_ALERT_EMAILS (comma-separated; empty: no
e-mail, failures show in the console only).
"""

import os
from pathlib import Path

from nanochat_flyte.config import ChatConfig, RLConfig, RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCE_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4.yaml")  # the reference run
TUNED_CONFIG = RunConfig.from_file(CONFIGS / "d8_t4_tuned.yaml")  # with later nanochat recipe changes
REFERENCE_CHAT_CONFIG = ChatConfig.from_file(CONFIGS / "chat_d8_t4.yaml")
REFERENCE_RL_CONFIG = RLConfig.from_file(CONFIGS / "rl_d8_t4.yaml")
# Depth 12 for ~3.2B tokens (20 per parameter, Chinchilla), bf16 on an A100: see the preset's comments.
D12_CONFIG = RunConfig.from_file(CONFIGS / "d12_a100.yaml")

NIGHTLY_CRON = os.environ.get("NANOCHAT_NIGHTLY_CRON", "0 3 * * *")
ALERT_EMAILS = [address.strip() for address in os.environ.get("NANOCHAT_ALERT_EMAILS", "").split(",")
                if address.strip()]
