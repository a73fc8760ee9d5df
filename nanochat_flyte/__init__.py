"""nanochat-flyte: a nanochat-class GPT from raw FineWeb-Edu shards to a chat model, as plain Python and torch.

The pipeline, one sub-package a stage, in import order (a package imports only those above it):

    errors, schema, config   the user's mistakes, how configs are read and checked, the three run configs
    hostile_text             a model's text made safe to show: control and bidi characters spelled out
    files                    atomic writes and the local paths behind URLs, which every stage uses
    data/                    shards, tokenizers, token files, conversations and the hub's datasets
    model/                   the GPT, its optimizers, checkpoints, devices and precision
    reporting/               W&B and metrics files, the report card, results JSON, the machine's description
    inference/               the one inference engine, its server scheduler, the chat server
    evaluation/              bits per byte, CORE, the chat evaluation and HumanEval's sandbox
    training/                the one training loop, and its three phases: pretraining, SFT, RL
    pipeline/                what each Flyte task does, as plain functions both Flyte fronts call
    cli/                     the `nanochat` command

The Flyte fronts (`workflows/`) call these functions; nothing here imports Flyte.
"""
