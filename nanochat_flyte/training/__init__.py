"""Training: the one loop (loop: Trainer, Phase) shared by its three phases, pretraining (pretrain), supervised
fine-tuning (sft) and reinforcement learning (rl). Imports every package above it but cli/."""
