"""Training: the one loop (loop: Trainer, Phase) shared by its three phases, pretraining (pretrain), supervised
fine-tuning (sft) and reinforcement learning (rl); and what a resumed run must share with the run it continues
(resume). Imports every package above it."""
