"""Referring-segmentation metrics as SAM3-I reports them: gIoU, cIoU and P@0.5, grouped by tags.

One prediction per sample (a datapoint at one instruction level): the OR of the kept masks
(HMPL, Ref-ZOM) or the best-scoring one (RefCOCO), against the OR of the datapoint's
annotations. Definitions (`scripts/evaluate.py` of SAM3-I; LISA's `validate` for the variant):
- gIoU: mean over samples of I / U. An empty prediction on an empty target (U = 0) has no
  defined IoU: SAM3-I counts it as 0 (`gIoU`); LISA computes I / (U + 1e-5) and adds 1 when
  U = 0 (`gIoU_lisa`). Both are reported because negatives make them differ.
- cIoU: sum I / sum U over the group (SAM3-I's script prints it as "mIoU").
- P@0.5: share of samples whose IoU (SAM3-I convention) is >= 0.5.
All three are percentages, as in the paper's tables.
"""

from __future__ import annotations

import collections
from typing import Iterable, Literal, Sequence

import numpy as np

CombineRule = Literal["union", "top1"]
LISA_EPS = 1e-5


def combine_detections(masks: np.ndarray, scores: np.ndarray, rule: CombineRule,
                       image_hw: tuple[int, int]) -> np.ndarray:
  """(K, H, W) kept masks and their (K,) scores -> one (H, W) bool prediction.

  `union` ORs them; `top1` keeps the best-scoring mask. No kept mask -> an empty prediction.
  """
  masks = np.asarray(masks, bool)
  if masks.shape[0] == 0:
    return np.zeros(image_hw, bool)
  if masks.shape[1:] != tuple(image_hw):
    raise ValueError(f"masks are {masks.shape[1:]}, expected the image size {tuple(image_hw)}")
  if rule == "union":
    return masks.any(axis=0)
  if rule == "top1":
    return masks[int(np.argmax(scores))]
  raise ValueError(f"unknown combine rule {rule!r}; use 'union' or 'top1'")


def intersection_union(pred: np.ndarray, target: np.ndarray,
                       ignore: np.ndarray | None = None) -> tuple[int, int]:
  """Pixel counts of pred AND target and pred OR target, leaving out the `ignore` pixels (LISA's
  ignore label: they count in neither)."""
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  if pred.shape != target.shape:
    raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in size")
  if ignore is not None:
    ignore = np.asarray(ignore, bool)
    if ignore.shape != target.shape:
      raise ValueError(f"ignore region {ignore.shape} and target {target.shape} differ in size")
    pred, target = pred & ~ignore, target & ~ignore
  return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))


def summarize(intersections: Iterable[int], unions: Iterable[int]) -> dict[str, float]:
  """gIoU, gIoU_lisa, cIoU, P@0.5 (percent) and the sample count of one group."""
  inter = np.asarray(list(intersections), np.float64)
  union = np.asarray(list(unions), np.float64)
  if inter.size == 0:
    return {"count": 0}
  iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  iou_lisa = inter / (union + LISA_EPS) + (union == 0)
  total_union = union.sum()
  return {
      "count": int(inter.size),
      "gIoU": 100.0 * float(iou.mean()),
      "gIoU_lisa": 100.0 * float(iou_lisa.mean()),
      "cIoU": 100.0 * float(inter.sum() / total_union) if total_union > 0 else 0.0,
      "P@0.5": 100.0 * float((iou >= 0.5).mean()),
  }


class SegmentationMetrics:
  """Accumulates per-sample intersections/unions with tags; reports every tag group.

  Tags are strings such as level="simple", subset="1toN", kind="part". `result()` returns
  the overall numbers under "all", each single tag under "level=simple", and each pair of tags
  in `crosses` (by default level x subset) under "level=simple/subset=1toN". A sample that lacks
  a tag is in no group of that tag.
  """

  def __init__(self, crosses: Sequence[tuple[str, str]] = (("level", "subset"),)):
    self.crosses = tuple(crosses)
    self.samples: list[tuple[int, int, dict[str, str]]] = []

  def add(self, pred: np.ndarray, target: np.ndarray, **tags: str) -> float:
    """Adds one sample; returns its IoU (SAM3-I convention) in [0, 1]."""
    inter, union = intersection_union(pred, target)
    self.add_counts(inter, union, **tags)
    return inter / union if union else 0.0

  def add_counts(self, intersection: int, union: int, **tags: str) -> None:
    if not 0 <= intersection <= union:
      raise ValueError(f"need 0 <= intersection <= union, got {intersection}, {union}")
    self.samples.append((int(intersection), int(union), {k: str(v) for k, v in tags.items()}))

  def result(self) -> dict[str, dict[str, float]]:
    groups: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for inter, union, tags in self.samples:
      keys = ["all"] + [f"{k}={v}" for k, v in sorted(tags.items())]
      keys += ["/".join(f"{k}={tags[k]}" for k in cross) for cross in self.crosses
               if all(k in tags for k in cross)]
      for key in keys:
        groups[key].append((inter, union))
    return {key: summarize(*zip(*pairs)) for key, pairs in sorted(groups.items())}
