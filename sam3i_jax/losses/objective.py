"""The training objective of a stage: SAM 3's loss on each instruction branch the stage trains,
plus, where the stage aligns them, the alignment terms between the simple and complex branches
(`sam3i_jax.losses.alignment`). Which branches and whether to align come from the stage's record
(`sam3i_jax.curriculum`); the objective knows no stage numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sam3i_jax.losses.alignment import AlignmentWeights, alignment_losses
from sam3i_jax.losses.detection import LossWeights, detection_loss

ALIGNED_LEVELS = ("simple", "complex")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of `loss_fn` (hashable, so it can be a static jit argument)."""
  levels: tuple[str, ...]  # the instruction levels whose branches are trained
  alignment: bool = False  # add the alignment terms between the simple and complex branches
  detection: LossWeights = LossWeights()
  alignment_weights: AlignmentWeights = AlignmentWeights()
  num_replicas: int = 1  # data-parallel replicas of the reference's per-GPU normalisation
  # loss_ce divides by B * max(Q, pad_num_queries) (the reference's 200); None: by B * Q, which a
  # model with few queries (the demo's 16) needs to learn its scores at a useful rate.
  pad_num_queries: int | None = 200
  # SAM 3's IoU-aware classification targets; False: binary (`detection_loss`).
  iou_aware_targets: bool = True

  def __post_init__(self):
    if not self.levels:
      raise ValueError("an objective needs at least one instruction level")
    if self.alignment and not set(ALIGNED_LEVELS) <= set(self.levels):
      raise ValueError(f"the alignment terms need the {ALIGNED_LEVELS} branches, not {self.levels}")


def union_masks(targets: Mapping[str, jax.Array]) -> jax.Array:
  """(B, M, M) bool: the OR of each example's valid target masks (the semantic-seg target)."""
  valid = targets["target_valid"][:, :, None, None]
  return jnp.any(jnp.logical_and(targets["masks"], valid), axis=1)


def loss_fn(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array],
            config: ObjectiveConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-> (total, metrics) for one training step.

  Args:
    outputs: the model outputs per instruction level (`config.levels`, e.g.
      {"simple": ..., "complex": ...}); with alignment also "embeddings": {"simple", "complex",
      "concept"} -> (B, D) projected mean-pooled text features (the concept ones through the
      frozen SAM 3 text path; they are the anchors).
    targets: the batch (boxes, target_valid, masks at the prediction resolution, and with
      alignment concept_id and example_valid).
  Returns:
    total (float32 scalar) and metrics: "loss", "<level>/loss", "<level>/<reference term>" and,
    with alignment, "align/<kl|hard|infonce|margin>" (weighted terms).
  """
  missing = [level for level in config.levels if level not in outputs]
  if missing:
    raise ValueError(f"the objective needs outputs for {config.levels}; missing {missing}")
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  for level in config.levels:
    branch_total, terms = detection_loss(outputs[level], targets, weights=config.detection,
                                         num_replicas=config.num_replicas,
                                         pad_num_queries=config.pad_num_queries,
                                         iou_aware_targets=config.iou_aware_targets)
    metrics[f"{level}/loss"] = branch_total
    metrics.update({f"{level}/{name}": value for name, value in terms.items()})
    total = total + branch_total
  if config.alignment:
    simple, complex_ = outputs["simple"], outputs["complex"]
    embeddings = outputs["embeddings"]
    example_valid = targets.get("example_valid")
    if example_valid is None:
      example_valid = jnp.ones(targets["boxes"].shape[:1], bool)
    align_total, terms = alignment_losses(
        simple["semantic_seg"], complex_["semantic_seg"], union_masks(targets),
        embeddings["simple"], embeddings["complex"], embeddings["concept"],
        targets["concept_id"], example_valid, config.alignment_weights)
    metrics.update({f"align/{name}": value for name, value in terms.items()})
    total = total + align_total
  metrics["loss"] = total
  return total, metrics
