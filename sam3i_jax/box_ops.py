"""Box conversions, IoU and generalized IoU (https://giou.stanford.edu/), pure JAX.

Boxes are `(..., 4)` arrays, either `cxcywh` (centre, width, height) or `xyxy` (corners). All
functions broadcast over leading batch dimensions, are jit-able and vmap-able, and follow
`sam3.model.box_ops` formula for formula (areas are not clamped, so an inverted box has a
negative area exactly as in the reference).

Degenerate boxes. Wherever the reference's value is defined (union > 0 for IoU; union > 0 and
enclosing-box area > 0 for GIoU) the values here are the same. Where the reference divides 0 by
0 and returns NaN, these functions return a finite value instead, and their gradients stay
finite:
- IoU = 0 when union == 0 (e.g. two zero-area boxes: their intersection has zero area too).
- The GIoU penalty (enclosing - union) / enclosing is 0 when the enclosing box has zero area
  (then both boxes are degenerate along the same line, union == 0 and IoU == 0, so GIoU == 0).
  Two zero-area boxes with a non-degenerate enclosing box get IoU 0 and GIoU -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(..., 4) cxcywh -> (..., 4) xyxy."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(..., 4) xyxy -> (..., 4) cxcywh."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """(..., 4) xyxy -> (...,) signed area (x1 - x0) * (y1 - y0)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den != 0, else 0; the double `where` keeps gradients finite."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _iou_giou(b1: jax.Array, b2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU and GIoU of already-broadcast xyxy boxes b1, b2 (..., 4) -> (...,), (...,)."""
  area1, area2 = box_area(b1), box_area(b2)
  inter_wh = jnp.maximum(
    jnp.minimum(b1[..., 2:], b2[..., 2:]) - jnp.maximum(b1[..., :2], b2[..., :2]), 0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area1 + area2 - inter
  iou = _safe_div(inter, union)
  hull_wh = jnp.maximum(
    jnp.maximum(b1[..., 2:], b2[..., 2:]) - jnp.minimum(b1[..., :2], b2[..., :2]), 0.0)
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  return iou, iou - _safe_div(hull - union, hull)


def _pairwise(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  # (..., N, 4), (..., M, 4) -> (..., N, 1, 4), (..., 1, M, 4)
  return boxes1[..., :, None, :], boxes2[..., None, :, :]


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise IoU of xyxy boxes: (..., N, 4) x (..., M, 4) -> (..., N, M)."""
  return _iou_giou(*_pairwise(boxes1, boxes2))[0]


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalized IoU of xyxy boxes: (..., N, 4) x (..., M, 4) -> (..., N, M)."""
  return _iou_giou(*_pairwise(boxes1, boxes2))[1]


def elementwise_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """IoU of corresponding xyxy boxes: (..., 4) x (..., 4) -> (...,) (broadcasting)."""
  return _iou_giou(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """GIoU of corresponding xyxy boxes: (..., 4) x (..., 4) -> (...,) (broadcasting).

  The reference's `fast_diag_generalized_box_iou` for (N, 4) inputs.
  """
  return _iou_giou(boxes1, boxes2)[1]
