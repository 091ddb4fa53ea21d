"""Training: the pretraining loop, optimizers, schedules, checkpoints and metrics."""
