"""Training: optimizer and schedule, sharding, checkpoints and the step/loop used by main.py."""
