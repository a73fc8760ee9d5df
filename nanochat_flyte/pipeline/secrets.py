"""The secrets a run can use: the environment variable the library reads each from, and the name a Flyte cluster
keeps it under. Both Flyte fronts declare their secrets from here.

Open-source Flyte 1 names a secret by group and key: the Kubernetes secret `wandb` with the key `api_key`. Union and
Flyte 2 name it by a key alone: `wandb_api_key`. NANOCHAT_<NAME>_SECRET_GROUP / _KEY rename one at registration time,
without editing code. Locally every secret is its environment variable: $WANDB_API_KEY, $HF_TOKEN.
"""

import os
from dataclasses import dataclass

from nanochat_flyte.inference.serve import API_KEY_ENV


@dataclass(frozen=True)
class SecretName:
    name: str  # NANOCHAT_<name>_SECRET_GROUP / _KEY rename the secret
    group: str
    key: str
    env_var: str  # where the library (or the chat server) reads it

    @property
    def settings(self) -> tuple[str, str]:
        """The environment variables that rename it: NANOCHAT_<name>_SECRET_GROUP and _KEY."""
        return f"NANOCHAT_{self.name}_SECRET_GROUP", f"NANOCHAT_{self.name}_SECRET_KEY"

    def group_and_key(self, grouped: bool) -> tuple[str | None, str]:
        """The secret's (group, key) on a cluster that names secrets by group and key (grouped) or by key alone."""
        group_setting, key_setting = self.settings
        group = os.environ.get(group_setting, self.group if grouped else "") or None
        key = os.environ.get(key_setting, self.key if grouped else f"{self.group}_{self.key}")
        return group, key


WANDB = SecretName("WANDB", "wandb", "api_key", "WANDB_API_KEY")  # absent: W&B runs offline
HF = SecretName("HF", "hf", "token", "HF_TOKEN")  # only for a gated or private mirror of the datasets
CHAT_API_KEY = SecretName("API", "nanochat", "api_key", API_KEY_ENV)  # the chat server's bearer token
ALL = (WANDB, HF, CHAT_API_KEY)
