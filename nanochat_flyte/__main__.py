"""`python -m nanochat_flyte COMMAND ...`: the `nanochat` command, where the script is not on PATH (torchrun -m)."""

from nanochat_flyte.cli import main

main()
