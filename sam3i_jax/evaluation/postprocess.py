"""SAM 3 outputs -> scored detections in original-image pixels (`Sam3Processor._forward_grounding`).

score = sigmoid(pred_logit) * sigmoid(presence_logit), or sigmoid(pred_logit) alone for a model
whose logits already carry the presence score (SAM 3.1: `Sam3Config.joint_presence_scores`; its
reference applies presence once, through the logits); a query is kept when score > threshold
(no NMS); its box goes cxcywh -> xyxy and is scaled by (W, H, W, H); its mask logits are
bilinearly resized to (H, W) with `F.interpolate(..., align_corners=False)` semantics (no
antialias, even when shrinking) and thresholded. The reference thresholds sigmoid(logit) > 0.5;
we threshold logit > 0, the same test except for logits in (0, ~1e-7], where float32 sigmoid
rounds to exactly 0.5.

Host-only numpy; only the kept masks are resized (`sam3i_jax.resize`, bit-exact with torch's CPU
kernel).
"""

from __future__ import annotations

import numpy as np

from sam3i_jax.resize import resize_logits_np


def _squeeze_batch(pred_logits, pred_boxes, pred_masks, presence_logit):
  """Accepts one image's outputs with or without a leading batch axis of size 1."""
  if np.ndim(pred_boxes) == 3:
    if np.shape(pred_boxes)[0] != 1:
      raise ValueError(f"one image at a time, got pred_boxes {np.shape(pred_boxes)}")
    pred_logits, pred_boxes, pred_masks = pred_logits[0], pred_boxes[0], pred_masks[0]
    presence_logit = presence_logit[0]
  q = np.shape(pred_boxes)[0]
  if (np.shape(pred_logits) != (q, 1) or np.shape(pred_boxes) != (q, 4) or np.ndim(pred_masks) != 3
      or np.shape(pred_masks)[0] != q or np.size(presence_logit) != 1):
    raise ValueError("expected pred_logits (Q, 1), pred_boxes (Q, 4), pred_masks (Q, h, w), "
                     f"presence_logit (1,); got {np.shape(pred_logits)}, {np.shape(pred_boxes)}, "
                     f"{np.shape(pred_masks)}, {np.shape(presence_logit)}")
  return pred_logits, pred_boxes, pred_masks, presence_logit


def _sigmoid(v: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-v))


def _scores_and_boxes(pred_logits, pred_boxes, presence_logit, orig_hw, presence_in_logits: bool):
  f32 = np.float32
  scores = _sigmoid(np.asarray(pred_logits, f32)[:, 0])
  if not presence_in_logits:
    scores = scores * _sigmoid(np.asarray(presence_logit, f32).reshape(()))
  cx, cy, w, h = [np.asarray(pred_boxes, f32)[:, i] for i in range(4)]
  half = f32(0.5)
  xyxy = np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], axis=-1)
  height, width = orig_hw
  scale = np.asarray([width, height, width, height], f32)
  return scores.astype(f32), (xyxy * scale).astype(f32)


def postprocess(pred_logits, pred_boxes, pred_masks, presence_logit, orig_hw: tuple[int, int],
                threshold: float = 0.5, *, presence_in_logits: bool = False,
                max_detections: int | None = None) -> dict[str, np.ndarray]:
  """Host-side post-processing of one image (numpy in, numpy out).

  Args:
    pred_logits: (Q, 1) query logits; pred_boxes: (Q, 4) normalised cxcywh;
    pred_masks: (Q, h, w) mask logits; presence_logit: (1,). A leading batch axis of 1 is ok.
    orig_hw: the original image's (H, W).
    presence_in_logits: the model's `config.joint_presence_scores` (SAM 3.1): score with the
      logits alone.
    max_detections: keep at most this many of the queries above the threshold, the best-scoring
      (for COCO AP); None: all of them.
  Returns:
    scores (K,) float32, boxes_xyxy (K, 4) float32 in original pixels, masks (K, H, W) bool,
    query_index (K,) int64; the K kept queries in query order.
  """
  pred_logits, pred_boxes, pred_masks, presence_logit = _squeeze_batch(
      *(np.asarray(a) for a in (pred_logits, pred_boxes, pred_masks, presence_logit)))
  orig_hw = (int(orig_hw[0]), int(orig_hw[1]))
  with np.errstate(over="ignore"):  # exp overflow -> sigmoid 0, as intended
    scores, boxes = _scores_and_boxes(pred_logits, pred_boxes, presence_logit, orig_hw,
                                      presence_in_logits)
  keep = np.flatnonzero(scores > threshold)
  if max_detections is not None and len(keep) > max_detections:
    best = np.argsort(-scores[keep], kind="stable")[:max_detections]
    keep = np.sort(keep[best])
  logits = resize_logits_np(pred_masks[keep], orig_hw)
  return {"scores": scores[keep], "boxes_xyxy": boxes[keep], "masks": logits > 0,
          "query_index": keep}
