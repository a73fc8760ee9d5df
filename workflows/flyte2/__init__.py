"""The Flyte 2 front: the same pipelines as workflows/, declared with the Flyte 2 SDK (`pip install -e ".[flyte2]"`)
on the same nanochat_flyte functions. docs/flyte2.md is the guide.

Entry files, for `flyte run` and `flyte deploy` from the repository root: nanochat.py (pretraining's `main`, its
presets and the nightly), chat.py (SFT, RL and the whole pipelines), scale_up.py (d12 on one or eight A100s) and
serve.py (the chat server as an app). The modules they share: environments.py (image, secrets, machines), support.py
(what the tasks do for Flyte 2), cli.py (what `flyte run` does with our inputs and errors) and pretraining.py
(pretraining's tasks). An entry file is imported under its own name by flyte's CLI: no module imports one.
"""

import importlib.util

# `pyflyte register workflows` (the flytekit front) imports every module under workflows/: without the flyte2 extra
# this folder shows it none.
if importlib.util.find_spec("flyte") is None:
    __path__ = []
