"""Box utilities vs sam3.model.box_ops on random and degenerate boxes."""

import parity  # noqa: F401  (CPU workarounds before sam3 is imported)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sam3.model import box_ops as ref

from sam3i_jax import box_ops

ATOL = 2e-6


def _random_xyxy(rng, shape):
  xy = rng.uniform(0, 1, shape + (2,))
  wh = rng.uniform(0.01, 0.6, shape + (2,))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _degenerate_xyxy():
  """Zero-width, zero-height, point, identical and disjoint boxes (xyxy)."""
  return np.array([
    [0.2, 0.2, 0.2, 0.6],  # zero width
    [0.2, 0.2, 0.6, 0.2],  # zero height
    [0.3, 0.3, 0.3, 0.3],  # point
    [0.3, 0.3, 0.3, 0.3],  # same point
    [0.7, 0.7, 0.7, 0.7],  # another point
    [0.2, 0.5, 0.2, 0.9],  # zero width, same x as the first
    [0.1, 0.1, 0.5, 0.5],  # regular
    [0.1, 0.1, 0.5, 0.5],  # identical regular
    [0.6, 0.6, 0.9, 0.9],  # disjoint regular
  ], np.float32)


def _t(x):
  return torch.from_numpy(np.array(x))  # a writable copy


def test_conversions_match_reference():
  rng = np.random.default_rng(0)
  cxcywh = np.concatenate([rng.uniform(0, 1, (3, 7, 2)), rng.uniform(0, 0.5, (3, 7, 2))],
                          -1).astype(np.float32)
  xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy, ref.box_cxcywh_to_xyxy(_t(cxcywh)).numpy(), atol=ATOL)
  back = box_ops.box_xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(back, ref.box_xyxy_to_cxcywh(_t(np.asarray(xyxy))).numpy(),
                             atol=ATOL)
  np.testing.assert_allclose(back, cxcywh, atol=ATOL)
  np.testing.assert_allclose(box_ops.box_area(xyxy), ref.box_area(_t(np.asarray(xyxy))).numpy(),
                             atol=ATOL)


@pytest.mark.parametrize("shape", [((9,), (5,)), ((2, 6), (2, 4)), ((1,), (1,))])
def test_pairwise_random_matches_reference(shape):
  rng = np.random.default_rng(1)
  (*batch, n), (*_, m) = shape
  b1 = _random_xyxy(rng, tuple(batch) + (n,))
  b2 = _random_xyxy(rng, tuple(batch) + (m,))
  b2[..., 0, :] = b1[..., 0, :]  # one identical pair (IoU 1)
  iou_ref, _ = ref.box_iou(_t(b1), _t(b2))
  giou_ref = ref.generalized_box_iou(_t(b1), _t(b2))
  iou = jax.jit(box_ops.box_iou)(b1, b2)
  giou = jax.jit(box_ops.generalized_box_iou)(b1, b2)
  assert iou.shape == giou.shape == tuple(batch) + (n, m)
  np.testing.assert_allclose(iou, iou_ref.numpy(), atol=ATOL)
  np.testing.assert_allclose(giou, giou_ref.numpy(), atol=ATOL)
  assert np.all(np.asarray(iou[..., 0, 0]) == 1.0)
  assert (np.asarray(iou) < 1 + 1e-6).all() and (np.asarray(giou) >= -1 - 1e-6).all()


def test_elementwise_matches_reference_and_diagonal():
  rng = np.random.default_rng(2)
  b1, b2 = _random_xyxy(rng, (11,)), _random_xyxy(rng, (11,))
  b1 = np.concatenate([b1, _degenerate_xyxy()[[0, 6]]])
  b2 = np.concatenate([b2, _degenerate_xyxy()[[6, 7]]])
  iou = box_ops.elementwise_box_iou(b1, b2)
  giou = box_ops.elementwise_generalized_box_iou(b1, b2)
  np.testing.assert_allclose(iou, ref.fast_diag_box_iou(_t(b1), _t(b2)).numpy(), atol=ATOL)
  np.testing.assert_allclose(giou, ref.fast_diag_generalized_box_iou(_t(b1), _t(b2)).numpy(),
                             atol=ATOL)
  np.testing.assert_allclose(iou, np.diagonal(box_ops.box_iou(b1, b2)), atol=0)
  np.testing.assert_allclose(giou, np.diagonal(box_ops.generalized_box_iou(b1, b2)), atol=0)


def test_degenerate_boxes_finite_and_reference_where_defined():
  boxes = _degenerate_xyxy()
  iou = np.asarray(box_ops.box_iou(boxes, boxes))
  giou = np.asarray(box_ops.generalized_box_iou(boxes, boxes))
  iou_ref, union_ref = ref.box_iou(_t(boxes), _t(boxes))
  giou_ref = ref.generalized_box_iou(_t(boxes), _t(boxes)).numpy()
  iou_ref = iou_ref.numpy()
  assert np.isfinite(iou).all() and np.isfinite(giou).all()
  defined = np.isfinite(iou_ref)
  assert (~defined).any() and defined.any()  # the fixture exercises both regimes
  np.testing.assert_allclose(iou[defined], iou_ref[defined], atol=ATOL)
  np.testing.assert_allclose(giou[np.isfinite(giou_ref)], giou_ref[np.isfinite(giou_ref)],
                             atol=ATOL)
  # documented values where the reference is 0/0: IoU 0; GIoU 0 for a zero-area hull, else -1
  assert (union_ref.numpy()[~defined] == 0).all()
  assert (iou[~defined] == 0).all()
  lo = np.minimum(boxes[:, None, :2], boxes[None, :, :2])
  hi = np.maximum(boxes[:, None, 2:], boxes[None, :, 2:])
  hull = np.prod(np.maximum(hi - lo, 0), -1)
  np.testing.assert_array_equal(giou[~defined], np.where(hull[~defined] == 0, 0.0, -1.0))
  assert giou[2, 3] == 0.0 and giou[2, 4] == -1.0  # same point; two distant points


def test_degenerate_gradients_finite():
  boxes = jnp.asarray(_degenerate_xyxy())
  def total(b):
    return (box_ops.generalized_box_iou(b, boxes).sum() + box_ops.box_iou(b, boxes).sum()
            + box_ops.elementwise_generalized_box_iou(b, boxes).sum()
            + box_ops.elementwise_box_iou(b, boxes).sum())
  grad = jax.jit(jax.grad(total))(boxes)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_vmap_equals_batched():
  rng = np.random.default_rng(3)
  b1, b2 = _random_xyxy(rng, (4, 6)), _random_xyxy(rng, (4, 3))
  batched = box_ops.generalized_box_iou(b1, b2)
  mapped = jax.jit(jax.vmap(box_ops.generalized_box_iou))(b1, b2)
  np.testing.assert_allclose(mapped, batched, atol=1e-7)
