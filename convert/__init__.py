"""Checkpoint conversion: PyTorch SAM 3 / SAM3-I -> Flax (orbax). `python -m convert --help`."""
