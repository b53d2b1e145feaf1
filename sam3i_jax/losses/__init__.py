"""Training objectives: box utilities, Hungarian / one-to-many matching and the SAM 3 losses."""

from sam3i_jax.losses.detection import DetectionTargets, LossWeights, detection_loss
from sam3i_jax.losses.matcher import HungarianMatch, hungarian_match, one_to_many_match

__all__ = ["DetectionTargets", "HungarianMatch", "LossWeights", "detection_loss",
           "hungarian_match", "one_to_many_match"]
