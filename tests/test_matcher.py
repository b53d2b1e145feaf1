"""Matchers: optimal cost vs scipy, degenerate cases, jit/vmap, parity with Meta's matchers."""

import parity  # noqa: F401  (CPU workarounds before sam3 is imported)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

from sam3i_jax.losses.matcher import hungarian_cost, hungarian_match, one_to_many_match

# float32 solver vs scipy's float64 on the same float32 cost matrix
COST_RTOL, COST_ATOL = 1e-5, 1e-4

_match = jax.jit(hungarian_match)
_o2m = jax.jit(one_to_many_match, static_argnames=("topk",))
_cost = jax.jit(hungarian_cost)


def _boxes(rng, shape):
  """Random cxcywh boxes inside the unit square."""
  c = rng.uniform(0.2, 0.8, shape + (2,))
  wh = rng.uniform(0.02, 0.4, shape + (2,))
  return np.concatenate([c, wh], -1).astype(np.float32)


def _inputs(rng, b, q, t):
  logits = (2 * rng.normal(size=(b, q, 1))).astype(np.float32)
  return logits, _boxes(rng, (b, q)), _boxes(rng, (b, t))


def _near_gt(rng, gt, q):
  """Predictions scattered around the GT boxes (so IoUs, and o2m matches, are non-trivial)."""
  b, t = gt.shape[:2]
  src = gt[np.arange(b)[:, None], rng.integers(0, t, (b, q))]
  out = src.copy()
  out[..., :2] += rng.normal(0, 0.03, (b, q, 2))
  out[..., 2:] *= rng.uniform(0.7, 1.3, (b, q, 2))
  return out.astype(np.float32)


def _check_assignment(m, valid):
  """Structural invariants of a HungarianMatch against the (B, T) validity mask."""
  qfg, gfq, matched = (np.asarray(x) for x in m)
  for b in range(valid.shape[0]):
    v = valid[b]
    assert (qfg[b][~v] == -1).all()
    assert (qfg[b][v] >= 0).all()
    assert len(set(qfg[b][v].tolist())) == v.sum()  # distinct queries
    assert matched[b].sum() == v.sum()
    assert (matched[b] == (gfq[b] >= 0)).all()
    for t in np.flatnonzero(v):
      assert gfq[b, qfg[b, t]] == t


def _assert_optimal(m, cost, valid):
  """Our total cost on the valid columns equals scipy's optimum of the valid sub-problem."""
  qfg = np.asarray(m.query_for_gt)
  cost = np.asarray(cost, np.float64)
  for b in range(valid.shape[0]):
    cols = np.flatnonzero(valid[b])
    ours = cost[b, qfg[b, cols], cols].sum()
    rows, c = linear_sum_assignment(cost[b][:, cols])
    best = cost[b][:, cols][rows, c].sum()
    np.testing.assert_allclose(ours, best, rtol=COST_RTOL, atol=COST_ATOL)


# few distinct shapes, shared by the tests below: each new shape costs a compile
@pytest.mark.parametrize("b,q,t", [(3, 8, 8), (4, 30, 7), (2, 200, 24), (2, 50, 3)])
def test_optimal_cost_equals_scipy_with_padding(b, q, t):
  rng = np.random.default_rng(b * 1000 + q + t)
  logits, pred, gt = _inputs(rng, b, q, t)
  valid = rng.uniform(size=(b, t)) < 0.6  # arbitrary (non-prefix) padding patterns
  valid[0] = True  # a full image
  if b > 2:
    valid[1] = False  # an image without GT
  # garbage in padded slots must not matter
  gt = np.where(valid[..., None], gt, np.float32(np.nan) if t > 1 else 0).astype(np.float32)
  m = _match(logits, pred, gt, valid)
  _check_assignment(m, valid)
  _assert_optimal(m, _cost(logits, pred, np.nan_to_num(gt)), valid)
  if b > 2:
    assert not np.asarray(m.matched)[1].any()


@pytest.mark.parametrize("most", [0, 1, 8, 9, 33, 64, 65, 129, 200])
def test_released_sizes_equal_scipy(most):
  """The recipe's Q = T = 200, 44 images (a stage-1 step's Hungarian problems), up to `most`
  valid GT scattered over the slots, so that every packed size of the solve is used; predictions
  random or near the GT, some GT duplicated (tied costs)."""
  rng = np.random.default_rng(most)
  b, q, t = 44, 200, 200
  logits, pred, gt = _inputs(rng, b, q, t)
  pred[b // 2:] = _near_gt(rng, gt[b // 2:], q)
  gt[::3, 1::2] = gt[::3, 0::2]  # duplicated boxes in a third of the images
  counts = np.minimum(rng.integers(0, most + 1, b), most)
  counts[0] = most
  valid = np.zeros((b, t), bool)
  for i, n in enumerate(counts):
    valid[i, rng.permutation(t)[:n]] = True
  m = _match(logits, pred, gt, valid)
  _check_assignment(m, valid)
  _assert_optimal(m, _cost(logits, pred, gt), valid)


def test_one_target_picks_the_cheapest_query():
  rng = np.random.default_rng(5)
  logits, pred, gt = _inputs(rng, 2, 50, 3)
  valid = np.array([[False, True, False], [True, False, False]])
  m = _match(logits, pred, gt, valid)
  cost = np.asarray(_cost(logits, pred, gt))
  assert m.query_for_gt[0, 1] == np.argmin(cost[0, :, 1])
  assert m.query_for_gt[1, 0] == np.argmin(cost[1, :, 0])
  assert np.asarray(m.matched).sum(1).tolist() == [1, 1]


def test_non_finite_predictions_still_give_an_assignment():
  rng = np.random.default_rng(10)
  logits, pred, gt = _inputs(rng, 2, 50, 3)
  logits[0, :5] = np.nan
  pred[1, :3] = np.inf
  valid = np.ones((2, 3), bool)
  m = _match(logits, pred, gt, valid)
  _check_assignment(m, valid)
  assert not np.isin(np.asarray(m.query_for_gt)[1], [0, 1, 2]).any()  # inf boxes cost +1e6


def test_no_targets():
  rng = np.random.default_rng(6)
  logits, pred, gt = _inputs(rng, 2, 50, 3)
  m = _match(logits, pred, gt, np.zeros((2, 3), bool))
  assert (np.asarray(m.query_for_gt) == -1).all() and (np.asarray(m.gt_for_query) == -1).all()
  assert not np.asarray(m.matched).any()
  m = hungarian_match(logits, pred, gt[:, :0], np.zeros((2, 0), bool))  # T == 0
  assert m.query_for_gt.shape == (2, 0) and not np.asarray(m.matched).any()
  assert one_to_many_match(logits, pred, gt[:, :0], np.zeros((2, 0), bool)).shape == (2, 50, 0)
  near = _near_gt(rng, gt, 50)
  assert np.asarray(_o2m(logits, near, gt, np.ones((2, 3), bool))).any()
  assert not np.asarray(_o2m(logits, near, gt, np.zeros((2, 3), bool))).any()


def test_ties_identical_boxes():
  rng = np.random.default_rng(7)
  b, q, t = 3, 8, 8
  pred = np.broadcast_to(_boxes(rng, (1, 1)), (b, q, 4)).copy()
  logits = np.zeros((b, q, 1), np.float32)
  gt = np.broadcast_to(_boxes(rng, (1, 1)), (b, t, 4)).copy()
  gt[1, :2] = pred[1, 0]  # image 1: two GT equal to the predictions, the rest identical
  logits[1, 3:6] = 1.0  # a few distinguished queries, so the optimum is not "anything"
  valid = np.ones((b, t), bool)
  valid[1, 3] = valid[2, 5:] = False
  m = _match(logits, pred, gt, valid)
  _check_assignment(m, valid)
  _assert_optimal(m, _cost(logits, pred, gt), valid)
  # o2m: with every score of a target equal, nothing is strictly above the quantile
  assert not np.asarray(_o2m(logits[:1], pred[:1], gt[:1], valid[:1])).any()


def test_more_valid_targets_than_queries_match_every_query():
  """T > Q: images with at most Q valid GT match each of them; images with more match every
  query to a distinct GT at scipy's optimum of the wide problem, the other slots get -1."""
  rng = np.random.default_rng(8)
  b, q, t = 4, 6, 11
  logits, pred, gt = _inputs(rng, b, q, t)
  valid = np.zeros((b, t), bool)
  valid[0, [1, 4, 9]] = True  # fewer than Q
  valid[1, rng.permutation(t)[:q]] = True  # exactly Q
  valid[2, rng.permutation(t)[:9]] = True  # more than Q
  valid[3] = True  # every slot
  m = _match(logits, pred, gt, valid)
  qfg, gfq = np.asarray(m.query_for_gt), np.asarray(m.gt_for_query)
  cost = np.asarray(_cost(logits, pred, gt), np.float64)
  _check_assignment(jax.tree.map(lambda x: x[:2], m), valid[:2])
  _assert_optimal(jax.tree.map(lambda x: x[:2], m), cost[:2], valid[:2])
  for i in (2, 3):
    cols = np.flatnonzero(valid[i])
    assert (gfq[i] >= 0).all() and len(set(gfq[i].tolist())) == q  # every query, distinct GT
    assert set(gfq[i].tolist()) <= set(cols.tolist())
    assert (qfg[i][~valid[i]] == -1).all() and (qfg[i] >= 0).sum() == q
    assert all(qfg[i, gfq[i, j]] == j for j in range(q))
    rows, c = linear_sum_assignment(cost[i][:, cols])
    np.testing.assert_allclose(cost[i, np.arange(q), gfq[i]].sum(), cost[i][:, cols][rows, c].sum(),
                               rtol=COST_RTOL, atol=COST_ATOL)
  with pytest.raises(ValueError, match="topk=4"):
    one_to_many_match(logits[:, :3], pred[:, :3], gt, valid, topk=4)


def test_vmap_over_layers_under_jit():
  rng = np.random.default_rng(9)
  layers, b, q, t = 2, 4, 30, 7
  logits = (2 * rng.normal(size=(layers, b, q, 1))).astype(np.float32)
  pred = _boxes(rng, (layers, b, q))
  gt = _boxes(rng, (b, t))
  valid = rng.uniform(size=(b, t)) < 0.6
  many = jax.jit(jax.vmap(hungarian_match, in_axes=(0, 0, None, None)))(logits, pred, gt, valid)
  o2m = jax.jit(jax.vmap(one_to_many_match, in_axes=(0, 0, None, None)))(
    logits, _near_gt(rng, np.broadcast_to(gt, (layers, b, t, 4)).reshape(-1, t, 4), q
                     ).reshape(layers, b, q, 4), gt, valid)
  assert many.query_for_gt.shape == (layers, b, t) and o2m.shape == (layers, b, q, t)
  for i in range(layers):
    one = _match(logits[i], pred[i], gt, valid)
    for x, y in zip(many, one):
      np.testing.assert_array_equal(x[i], y)


# --- parity with Meta's matchers, called as sam3/train does -------------------------------------

def _packed_targets(gt, num_boxes):
  """BatchedFindTarget-style dict (collator.py / Sam3Image.back_convert): packed + padded boxes."""
  n_max = int(num_boxes.max())
  padded = np.zeros((gt.shape[0], n_max, 4), np.float32)
  for b, n in enumerate(num_boxes):
    padded[b, :n] = gt[b, :n]
  return {
    "boxes": torch.from_numpy(np.concatenate([gt[b, :n] for b, n in enumerate(num_boxes)])),
    "boxes_padded": torch.from_numpy(padded),
    "num_boxes": torch.from_numpy(np.asarray(num_boxes, np.int64)),
  }


def _outputs(logits, pred):
  return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(pred)}


@pytest.mark.parametrize("num_boxes,q,t", [([3, 20], 200, 24), ([1, 5, 0, 7], 30, 7),
                                           ([0, 2, 8], 8, 8)])
def test_hungarian_parity_with_reference(num_boxes, q, t):
  rng = np.random.default_rng(sum(num_boxes) + q)
  num_boxes = np.asarray(num_boxes)
  b = len(num_boxes)
  logits, _, gt = _inputs(rng, b, q, t)
  pred = _near_gt(rng, gt, q)  # near-duplicates: the choice among queries really matters
  valid = np.arange(t)[None] < num_boxes[:, None]
  ref = BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                 alpha=0.25, gamma=2, stable=False)  # model_builder.py
  batch_idx, src_idx, tgt_idx = ref(_outputs(logits, pred), _packed_targets(gt, num_boxes))
  assert tgt_idx is None  # Q >= num_boxes: src_idx is in target order per image
  m = _match(logits, pred, np.where(valid[..., None], gt, 0), valid)
  qfg = np.asarray(m.query_for_gt)
  np.testing.assert_array_equal(batch_idx.numpy(), np.repeat(np.arange(b), num_boxes))
  np.testing.assert_array_equal(src_idx.numpy(), qfg[valid])


def _o2m_reference_mask(batch_idx, src_idx, tgt_idx, num_boxes, shape):
  offsets = np.concatenate([[0], np.cumsum(num_boxes)[:-1]])
  out = np.zeros(shape, bool)
  b = batch_idx.numpy()
  out[b, src_idx.numpy(), tgt_idx.numpy() - offsets[b]] = True
  return out


@pytest.mark.parametrize("num_boxes,q,topk", [([3, 0, 20, 7], 200, 4), ([4, 2], 5, 3),
                                              ([6, 1, 3], 30, 6)])
def test_one_to_many_parity_with_reference(num_boxes, q, topk):
  rng = np.random.default_rng(q + topk)
  num_boxes = np.asarray(num_boxes)
  b, t = len(num_boxes), int(num_boxes.max())
  logits, _, gt = _inputs(rng, b, q, t)
  pred = _near_gt(rng, gt, q)
  valid = np.arange(t)[None] < num_boxes[:, None]
  ref = BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=topk)
  targets = _packed_targets(gt, num_boxes)
  want = _o2m_reference_mask(*ref(_outputs(logits, pred), targets), num_boxes, (b, q, t))
  got = np.asarray(_o2m(logits, pred, gt, valid, topk=topk))
  assert want.sum() > b  # non-trivial
  np.testing.assert_array_equal(got, want)
  assert (got.sum(1) <= topk).all()
  # with invalid queries (the reference's out_is_valid: -1e9 scores, still in the quantile)
  pred_valid = rng.uniform(size=(b, q)) < 0.7
  want = _o2m_reference_mask(
    *ref(_outputs(logits, pred), targets, out_is_valid=torch.from_numpy(pred_valid)),
    num_boxes, (b, q, t))
  got = np.asarray(_o2m(logits, pred, gt, valid, topk=topk, pred_valid=pred_valid))
  np.testing.assert_array_equal(got, want)
