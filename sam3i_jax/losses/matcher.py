"""SAM 3's matchers in pure JAX: one-to-one Hungarian and DAC one-to-many, jit/vmap-able.

Ports of `sam3.train.matcher.BinaryHungarianMatcherV2` (as built for training: focal=True,
cost_class=2, cost_bbox=5, cost_giou=2, alpha=0.25, gamma=2, stable=False,
remove_samples_with_0_gt=True) and `BinaryOneToManyMatcher` (as configured: alpha=0.3,
threshold=0.4, topk=4). The reference packs a variable number of targets per image; here the
targets are padded to a static T with a validity mask, and the assignment problems are solved on
the device by `sam3i_jax.losses.assignment` (shortest augmenting paths over the valid targets
only, as scipy's solver) instead of scipy on the host.

Shapes: B images, Q queries, T ground-truth slots (padded). Boxes are normalised cxcywh.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam3i_jax.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from sam3i_jax.losses import assignment, packing


_BIG_COST = 1e6


class HungarianMatch(NamedTuple):
  """One-to-one assignment for a batch.

  query_for_gt: (B, T) int32, the query matched to each GT slot; -1 for padded slots.
  gt_for_query: (B, Q) int32, the GT slot matched to each query; -1 for unmatched queries.
  matched: (B, Q) bool, True for the queries that are matched to a valid GT.
  """
  query_for_gt: jax.Array
  gt_for_query: jax.Array
  matched: jax.Array


def _logits_bq(pred_logits: jax.Array) -> jax.Array:
  """(B, Q, 1) or (B, Q) -> (B, Q)."""
  if pred_logits.ndim == 3:
    if pred_logits.shape[-1] != 1:
      raise ValueError(f"binary matchers need one logit per query, got {pred_logits.shape}")
    pred_logits = pred_logits[..., 0]
  return pred_logits


def hungarian_cost(pred_logits: jax.Array, pred_boxes: jax.Array, gt_boxes: jax.Array, *,
                   cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                   alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """SAM 3's matching cost (lower is better): (B, Q, 1), (B, Q, 4), (B, T, 4) -> (B, Q, T).

  C = cost_bbox * L1(pred cxcywh, gt cxcywh) + cost_class * focal - cost_giou * GIoU, with the
  focal term of the positive class only, which depends on the query alone (p = sigmoid(x)):
    focal = -alpha (1 - p)^gamma log sigmoid(x) + (1 - alpha) p^gamma log sigmoid(-x),
  i.e. the focal loss for "object" minus the focal loss for "no object".
  """
  x = _logits_bq(pred_logits).astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  gt_boxes = gt_boxes.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  # an integral gamma as an int: p ** 2 is p * p, as in torch (a float power is not)
  gamma = int(gamma) if float(gamma).is_integer() else gamma
  focal = (-alpha * (1 - p) ** gamma * jax.nn.log_sigmoid(x)
           + (1 - alpha) * p ** gamma * jax.nn.log_sigmoid(-x))  # (B, Q)
  l1 = jnp.abs(pred_boxes[..., :, None, :] - gt_boxes[..., None, :, :]).sum(-1)
  giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
  return cost_bbox * l1 + cost_class * focal[..., None] - cost_giou * giou


def _solve_batch(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cost (B, Q, T), valid (B, T) -> query_for_gt (B, T), gt_for_query (B, Q).

  The valid GT slots are the rows that `assignment.solve` assigns, one augmenting path each, so
  padded slots cost no search. If an image has more valid GT than queries (possible only when
  T > Q), the queries are the rows instead: every query gets a distinct valid GT, as scipy's
  linear_sum_assignment does on a wide matrix. Both orientations share one (B, S, S) frame,
  S = max(Q, T); with T <= Q the frame is just the transposed (B, T, Q) cost.
  """
  batch, num_queries, num_targets = cost.shape
  # non-finite costs (NaN/inf predictions) would leave the solver's duals undefined
  cost = jnp.nan_to_num(cost, nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)
  by_target = jnp.swapaxes(cost, 1, 2)  # rows = GT slots, columns = queries
  if num_targets <= num_queries:
    query_for_gt, gt_for_query, _ = assignment.solve(by_target, valid)
    return jnp.where(valid, query_for_gt, -1), gt_for_query
  size = num_targets
  by_query = jnp.pad(cost, ((0, 0), (0, size - num_queries), (0, 0)))  # rows = queries
  by_target = jnp.pad(by_target, ((0, 0), (0, 0), (0, size - num_queries)))
  is_query = jnp.arange(size) < num_queries
  wide = valid.sum(-1) > num_queries  # more valid GT than queries: queries are the rows
  frame = jnp.where(wide[:, None, None], by_query, by_target)
  rows = jnp.where(wide[:, None], is_query, valid)
  cols = jnp.where(wide[:, None], valid, is_query)
  col_for_row, row_for_col, _ = assignment.solve(frame, rows, cols)
  query_for_gt = jnp.where(wide[:, None], row_for_col, col_for_row)
  gt_for_query = jnp.where(wide[:, None], col_for_row, row_for_col)[:, :num_queries]
  return jnp.where(valid, query_for_gt, -1), gt_for_query


def hungarian_match(pred_logits: jax.Array, pred_boxes: jax.Array, gt_boxes: jax.Array,
                    gt_valid: jax.Array, *, cost_class: float = 2.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0,
                    packed: bool = False) -> HungarianMatch:
  """Minimum-cost one-to-one matching of queries to the valid GT boxes of each image.

  Args:
    pred_logits: (B, Q, 1) (or (B, Q)) classification logits.
    pred_boxes: (B, Q, 4) predicted boxes, cxcywh.
    gt_boxes: (B, T, 4) GT boxes, cxcywh; the values in padded slots are ignored.
    gt_valid: (B, T) bool, True for real GT slots (any pattern, not only a prefix).
    cost_*, alpha, gamma: the cost of `hungarian_cost` (defaults: SAM 3 training).
    packed: the caller has already packed the valid slots first and sized T to the batch
      (`sam3i_jax.losses.packing`, as `detection_loss` does): solve on the slots as given.

  Returns:
    `HungarianMatch` (query_for_gt (B, T), gt_for_query (B, Q), matched (B, Q)). Every valid
    slot gets a distinct query, minimising the sum of `hungarian_cost` over the valid slots (as
    scipy's linear_sum_assignment on the valid columns; among tied optima the choice may differ).
    An image with more valid GT than queries has every query matched to a distinct GT, again at
    scipy's optimum, and its other valid slots get -1. An image without valid GT has every query
    unmatched (the reference skips such images).

  The work follows the valid GT, not the T slots: the valid slots are packed first and the cost
  and the solver (`assignment.solve`) see only the first k slots, k the batch's largest valid
  count rounded up to one of `packing.SLOT_SIZES` (one `lax.switch` branch per size). Not
  differentiable (inputs pass through stop_gradient). The solver runs in float32: the total
  cost is optimal up to float32 rounding. Non-finite costs (NaN or inf predictions) are replaced
  by +-1e6, so the solver always terminates with a valid assignment.
  """
  pred_logits = _logits_bq(pred_logits)
  batch, num_queries = pred_logits.shape
  num_targets = gt_boxes.shape[-2]
  if num_targets == 0:
    return HungarianMatch(jnp.zeros((batch, 0), jnp.int32),
                          jnp.full((batch, num_queries), -1, jnp.int32),
                          jnp.zeros((batch, num_queries), bool))
  pred_logits, pred_boxes, gt_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes, gt_boxes))
  valid = jnp.asarray(gt_valid).astype(bool)

  def solve(boxes: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    cost = hungarian_cost(pred_logits, pred_boxes, boxes, cost_class=cost_class,
                          cost_bbox=cost_bbox, cost_giou=cost_giou, alpha=alpha, gamma=gamma)
    return _solve_batch(cost, valid)

  if packed:
    query_for_gt, gt_for_query = solve(gt_boxes, valid)
  else:
    order = packing.valid_first(valid)
    packed_boxes = packing.gather_slots(gt_boxes, order)
    packed_valid = packing.gather_slots(valid, order)

    def solve_first(k: int) -> tuple[jax.Array, jax.Array]:
      query_for_slot, slot_for_query = solve(packed_boxes[:, :k], packed_valid[:, :k])
      return (jnp.pad(query_for_slot, ((0, 0), (0, num_targets - k)), constant_values=-1),
              slot_for_query)

    query_for_slot, slot_for_query = packing.by_valid_count(valid, solve_first)
    query_for_gt = packing.gather_slots(query_for_slot, jnp.argsort(order, axis=-1))
    gt_for_query = jnp.where(slot_for_query >= 0,
                             jnp.take_along_axis(order, jnp.maximum(slot_for_query, 0), 1), -1)
  return HungarianMatch(query_for_gt, gt_for_query, gt_for_query >= 0)


def _torch_quantile_rank(q: float, n: int) -> tuple[int, int, np.float32]:
  """(below, above, weight) of torch.quantile's linear interpolation at q over n values.

  torch turns the Python float q into a float32 tensor and computes rank = q * (n - 1) in
  float32; replicated here so the threshold sits exactly where the reference puts it.
  """
  rank = np.float32(q) * np.float32(n - 1)
  below = int(np.floor(rank))
  above = int(np.ceil(rank))
  return below, above, np.float32(rank - np.float32(below))


def one_to_many_match(pred_logits: jax.Array, pred_boxes: jax.Array, gt_boxes: jax.Array,
                      gt_valid: jax.Array, *, alpha: float = 0.3, threshold: float = 0.4,
                      topk: int = 4, pred_valid: jax.Array | None = None) -> jax.Array:
  """DAC one-to-many assignment (`BinaryOneToManyMatcher`): -> (B, Q, T) bool.

  Score S = alpha * sigmoid(logit) + (1 - alpha) * IoU(pred, gt) for every (query, GT) pair.
  Pair (q, t) is assigned iff t is valid, S[q, t] > threshold and S[q, t] is strictly above the
  (1 - topk / Q) quantile of S[:, t] over the queries (torch.quantile, linear interpolation),
  i.e. it is among the top-k queries of that target (fewer on ties). As in the reference a
  query may be assigned to several targets, and an image without valid GT gets no pairs.

  Args:
    pred_logits: (B, Q, 1) (or (B, Q)) logits.
    pred_boxes: (B, Q, 4) cxcywh.
    gt_boxes: (B, T, 4) cxcywh (padded slots ignored).
    gt_valid: (B, T) bool.
    alpha, threshold, topk: the reference's parameters (defaults: SAM 3 training config).
    pred_valid: optional (B, Q) bool; invalid queries score -1e9 (so they still count in the
      quantile, as in the reference) and are never assigned.

  Raises:
    ValueError at trace time unless 1 <= topk <= Q (torch.quantile rejects q < 0).
  """
  pred_logits = _logits_bq(pred_logits)
  batch, num_queries = pred_logits.shape
  num_targets = gt_boxes.shape[-2]
  if not 1 <= topk <= num_queries:
    raise ValueError(f"one_to_many_match: topk={topk} must be in [1, Q={num_queries}]")
  if num_targets == 0:
    return jnp.zeros((batch, num_queries, 0), bool)
  pred_logits, pred_boxes, gt_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes, gt_boxes))
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
  iou = box_iou(box_cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)),
                box_cxcywh_to_xyxy(gt_boxes.astype(jnp.float32)))
  score = alpha * prob[..., None] + (1 - alpha) * iou  # (B, Q, T)
  if pred_valid is not None:
    score = jnp.where(pred_valid[..., None], score, -1e9)
  # quantile over queries: only the top (Q - below) values are needed, descending
  below, above, weight = _torch_quantile_rank(1 - topk / num_queries, num_queries)
  top = jax.lax.top_k(jnp.swapaxes(score, -1, -2), num_queries - below)[0]  # (B, T, k)
  lo, hi = top[..., num_queries - 1 - below], top[..., num_queries - 1 - above]
  if abs(weight) < 0.5:  # torch's lerp formula
    quantile = lo + weight * (hi - lo)
  else:
    quantile = hi - (hi - lo) * (np.float32(1) - weight)
  match = (score > quantile[..., None, :]) & (score > threshold)
  match &= gt_valid[..., None, :].astype(bool)
  if pred_valid is not None:
    match &= pred_valid[..., None]
  return match
