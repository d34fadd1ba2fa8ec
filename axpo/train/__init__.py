"""Training: the DeepSpeed trainer, checkpoints, weight sync, the SFT and RL stages, reports."""
