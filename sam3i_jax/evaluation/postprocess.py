"""SAM 3 outputs -> scored detections in original-image pixels (`Sam3Processor._forward_grounding`).

score = sigmoid(pred_logit) * sigmoid(presence_logit), or sigmoid(pred_logit) alone for a model
whose logits already carry the presence score (SAM 3.1: `Sam3Config.joint_presence_scores`; its
reference applies presence once, through the logits); a query is kept when score > threshold
(no NMS); its box goes cxcywh -> xyxy and is scaled by (W, H, W, H); its mask logits are
bilinearly resized to (H, W) with `F.interpolate(..., align_corners=False)` semantics (no
antialias, even when shrinking) and thresholded. The reference thresholds sigmoid(logit) > 0.5;
we threshold logit > 0, the same test except for logits in (0, ~1e-7], where float32 sigmoid
rounds to exactly 0.5.

Two routes:
- `postprocess`: host-only numpy; resizes only the kept masks. Simplest; what `predict` uses.
- `postprocess_device` (jittable; `orig_hw` and `top_k` static, so one compile per image size)
  followed by `select_detections` on the host, which applies the threshold (a data-dependent
  count) and returns the kept queries in query order, as the reference does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """(index0, index1, lambda0, lambda1) of torch's bilinear, align_corners=False, no antialias.

  Source coordinate (i + 0.5) * in/out - 0.5, clamped at 0; the upper neighbour is clamped to
  the last pixel. Rounded as torch's CPU kernel does for float32 inputs (float32 scale,
  float64 arithmetic, float32 result): near 288 -> 1008 a plain float32 or float64 coordinate
  moves the logits by up to 5e-5 / 3e-4.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
  l0 = (np.float32(1.0) - l1).astype(np.float32)
  return i0, i1, l0, l1


def _fma32(a, b, c):
  """float32 fused multiply-add a * b + c (one rounding), via float64 (exact product)."""
  return (a.astype(np.float64) * b.astype(np.float64) + c).astype(np.float32)


def resize_mask_logits_np(masks: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """float32 (..., h, w) -> (..., H, W), bit-exact with torch's CPU F.interpolate(bilinear).

  Width pass then height pass, each `fma(v0, l0, v1 * l1)` as torch's vectorised kernel
  (checked bit-exact for upsampling; very small outputs take another torch path, <= 1e-6 off).
  """
  masks = np.asarray(masks, np.float32)
  (h, w), (out_h, out_w) = masks.shape[-2:], out_hw
  x0, x1, wx0, wx1 = bilinear_taps(w, out_w)
  y0, y1, wy0, wy1 = bilinear_taps(h, out_h)
  rows = _fma32(np.take(masks, x0, axis=-1), wx0, np.take(masks, x1, axis=-1) * wx1)
  return _fma32(np.take(rows, y0, axis=-2), wy0[:, None], np.take(rows, y1, axis=-2) * wy1[:, None])


def resize_mask_logits(masks: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Jittable: float32 (..., h, w) -> (..., H, W), as F.interpolate(bilinear, align_corners=False).

  Same taps as `resize_mask_logits_np`; XLA decides on FMA contraction, so values may differ
  from torch by an ulp or so.
  """
  masks = jnp.asarray(masks, jnp.float32)
  (h, w), (out_h, out_w) = masks.shape[-2:], tuple(out_hw)
  x0, x1, wx0, wx1 = bilinear_taps(w, out_w)
  y0, y1, wy0, wy1 = bilinear_taps(h, out_h)
  rows = jnp.take(masks, x0, axis=-1) * wx0 + jnp.take(masks, x1, axis=-1) * wx1
  return jnp.take(rows, y0, axis=-2) * wy0[:, None] + jnp.take(rows, y1, axis=-2) * wy1[:, None]


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


def _scores_and_boxes(xp, pred_logits, pred_boxes, presence_logit, orig_hw,
                      presence_in_logits: bool = False):
  sigmoid = jax.nn.sigmoid if xp is jnp else (lambda v: 1.0 / (1.0 + np.exp(-v)))
  f32 = xp.float32
  scores = sigmoid(xp.asarray(pred_logits, f32)[:, 0])
  if not presence_in_logits:
    scores = scores * sigmoid(xp.asarray(presence_logit, f32).reshape(()))
  cx, cy, w, h = [xp.asarray(pred_boxes, f32)[:, i] for i in range(4)]
  half = f32(0.5)
  xyxy = xp.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], axis=-1)
  height, width = orig_hw
  scale = xp.asarray([width, height, width, height], f32)
  return scores.astype(f32), (xyxy * scale).astype(f32)


def postprocess(pred_logits, pred_boxes, pred_masks, presence_logit, orig_hw: tuple[int, int],
                threshold: float = 0.5, *, presence_in_logits: bool = False
                ) -> dict[str, np.ndarray]:
  """Host-side post-processing of one image (numpy in, numpy out).

  Args:
    pred_logits: (Q, 1) query logits; pred_boxes: (Q, 4) normalised cxcywh;
    pred_masks: (Q, h, w) mask logits; presence_logit: (1,). A leading batch axis of 1 is ok.
    orig_hw: the original image's (H, W).
    presence_in_logits: the model's `config.joint_presence_scores` (SAM 3.1): score with the
      logits alone.
  Returns:
    scores (K,) float32, boxes_xyxy (K, 4) float32 in original pixels, masks (K, H, W) bool,
    query_index (K,) int64; the K kept queries in query order.
  """
  pred_logits, pred_boxes, pred_masks, presence_logit = _squeeze_batch(
      *(np.asarray(a) for a in (pred_logits, pred_boxes, pred_masks, presence_logit)))
  orig_hw = (int(orig_hw[0]), int(orig_hw[1]))
  with np.errstate(over="ignore"):  # exp overflow -> sigmoid 0, as intended
    scores, boxes = _scores_and_boxes(np, pred_logits, pred_boxes, presence_logit, orig_hw,
                                      presence_in_logits)
  keep = np.flatnonzero(scores > threshold)
  logits = resize_mask_logits_np(pred_masks[keep], orig_hw)
  return {"scores": scores[keep], "boxes_xyxy": boxes[keep], "masks": logits > 0,
          "query_index": keep}


def postprocess_device(pred_logits, pred_boxes, pred_masks, presence_logit,
                       orig_hw: tuple[int, int], top_k: int | None = None) -> dict[str, jax.Array]:
  """Jitted part: scores, pixel boxes and resized mask logits of all or the top-k queries.

  Shapes as in `postprocess` (one image). With `top_k`, the k best-scoring queries (sorted by
  score) are returned, which bounds the (k, H, W) float32 mask memory (all 200 queries at
  1008x1344 would be 1 GiB); without it, all Q. Compiles once per (orig_hw, top_k, shapes).
  Returns scores (k,), boxes_xyxy (k, 4), mask_logits (k, H, W), query_index (k,) int32 and
  num_queries (Q).
  """
  orig_hw = (int(orig_hw[0]), int(orig_hw[1]))
  top_k = None if top_k is None else int(top_k)
  return _postprocess_device(pred_logits, pred_boxes, pred_masks, presence_logit, orig_hw, top_k)


@functools.partial(jax.jit, static_argnames=("orig_hw", "top_k"))
def _postprocess_device(pred_logits, pred_boxes, pred_masks, presence_logit,
                        orig_hw: tuple[int, int], top_k: int | None) -> dict[str, jax.Array]:
  pred_logits, pred_boxes, pred_masks, presence_logit = _squeeze_batch(
      pred_logits, pred_boxes, pred_masks, presence_logit)
  scores, boxes = _scores_and_boxes(jnp, pred_logits, pred_boxes, presence_logit, orig_hw)
  q = scores.shape[0]
  if top_k is None or top_k >= q:
    index = jnp.arange(q, dtype=jnp.int32)
  else:
    _, index = jax.lax.top_k(scores, top_k)
    index = index.astype(jnp.int32)
  masks = resize_mask_logits(jnp.take(pred_masks, index, axis=0), orig_hw)
  return {"scores": scores[index], "boxes_xyxy": boxes[index], "mask_logits": masks,
          "query_index": index, "num_queries": jnp.asarray(q, jnp.int32)}


def select_detections(device_out: dict, threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Host part: keep score > threshold, in query order; masks = resized logits > 0.

  `complete` is False when `top_k` may have cut off queries above the threshold (all k
  returned queries passed it and k < Q); raise top_k then.
  """
  out = jax.device_get(device_out)
  scores, index = np.asarray(out["scores"]), np.asarray(out["query_index"])
  keep = np.flatnonzero(scores > threshold)
  keep = keep[np.argsort(index[keep], kind="stable")]
  complete = bool(len(keep) < len(scores) or len(scores) == int(out["num_queries"]))
  return {"scores": scores[keep], "boxes_xyxy": np.asarray(out["boxes_xyxy"])[keep],
          "masks": np.asarray(out["mask_logits"])[keep] > 0,
          "query_index": index[keep].astype(np.int64), "complete": complete}
