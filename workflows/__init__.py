"""Flyte wiring for nanochat_flyte: tasks, workflows, images and launch plans."""
