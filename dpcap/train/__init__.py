"""The trainer: one logical DP step, checkpoints, the resumable run loop, metrics."""
