"""Training: the loop, its losses and metrics, checkpoints and plots."""
