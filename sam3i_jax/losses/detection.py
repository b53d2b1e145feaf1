"""SAM 3's detection and segmentation training losses, pure JAX, static shapes.

A port of `sam3.train.loss.sam3_loss.Sam3LossWrapper` and the loss classes of
`sam3.train.loss.loss_fns` as SAM3-I's `train/configs/sam3i/base.yaml` configures them (every
stage uses this loss on each branch):

- Matching: `BinaryHungarianMatcherV2` (focal cost 2, L1 5, GIoU 2) on the one-to-one queries of
  every decoder layer; `BinaryOneToManyMatcher` (alpha 0.3, threshold 0.4, top-4) on the last
  layer's one-to-many (DAC) queries; the aux layers' one-to-many queries are matched with the
  Hungarian matcher (`use_o2m_matcher_on_o2m_aux: false`).
- `Boxes`, every layer: loss_bbox = sum of L1(cxcywh) / N, loss_giou = sum of (1 - GIoU) / N.
- `IABCEMdetr` (pos_weight 10, alpha 0.25, gamma 2, use_presence, weak_loss off,
  pad_n_queries 200), every layer: a matched query gets BCE(x, t) * 10 with the IoU-aware target
  t = clamp(p^0.25 IoU^0.75, 0.01) (no gradient through t), any other query BCE(x, 0) * p^2;
  prompts without a visible GT box (w > 0 and h > 0) get no loss; loss_ce = sum / (B * max(Q,
  200)). presence_loss = mean over prompts of the focal loss (alpha 0.5, gamma 0) of the presence
  logit against "has a visible GT box", for the prediction sets that have a presence logit (the
  one-to-one queries of every layer).
- `Masks`, last layer only (`compute_aux: false`): loss_mask = sum over matched pairs of the
  pixel-mean focal loss (alpha 0.25, gamma 2) / N, loss_dice = sum of the dice losses / N.
- `SemanticSegCriterion` (presence_head, presence_loss off, focal alpha 0.6, gamma 2):
  loss_semantic_seg / loss_semantic_dice = pixel-mean focal loss / dice loss of `semantic_seg`
  against the union of the GT masks, averaged over the prompts whose union is not empty.
- The one-to-many terms are multiplied by the o2m weight 2 inside the terms (as the reference
  reports them); total = sum of weight * term, times sqrt(per-replica batch size)
  (`scale_by_find_batch_size: True`).

Term names are the reference's: loss_ce, presence_loss, loss_bbox, loss_giou, loss_mask,
loss_dice with the suffixes "" (last layer), "_aux_{i}" (layer i), then "_o2m"; plus
loss_semantic_seg, loss_semantic_dice. Terms that are zero by construction in the reference
(presence_loss_o2m, the dummy loss_semantic_presence) and its metrics (ce_f1, accuracies, mIoU)
are not returned.

Normalisation and replicas. Training compiles one function over the global batch; the reference
runs one loss per data-parallel replica and DDP averages the gradients. `num_replicas` = R
splits the batch into R contiguous equal groups (the examples each replica would hold) and the
result is the average over replicas of the reference's per-replica loss, exactly:
N = max(valid GT boxes in the global batch / R, 1) (the reference's all-reduced mean, clamped);
pair sums (boxes, masks) are global sums / (N R); loss_ce and presence_loss are global means
(equal-sized replicas); the semantic terms are averaged within each replica over its prompts
with a non-empty union, then over replicas; the sqrt scaling uses the per-replica batch B / R.

Deliberate differences from the reference:
- Resolution: the reference (`downsample: False`) bilinearly upsamples the predicted masks and
  semantic map to the GT resolution (the 1008 canvas). Here masks are compared at the prediction
  resolution M (a 200-target batch at 1008^2 is too big): targets come at M from the pipeline,
  and larger targets are downsampled on device by `resize_bool_masks` (the reference's own
  `downsample=True` rule: bilinear, align_corners=False, then any non-zero value is True).
- A one-to-many query matched to several GT boxes gets, in loss_ce, the IoU-aware target of its
  highest-index GT slot: the reference writes all of them with one indexed assignment, where the
  last write wins on CPU (and the order is undefined on GPU).
- Degenerate boxes give finite IoU/GIoU (see `sam3i_jax.box_ops`) where the reference has NaN.
- Padding examples do not exist in the reference and `example_valid` is not read here: an
  example without valid targets is a negative prompt (drop incomplete batches in training).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam3i_jax.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from sam3i_jax.losses.functional import (binary_cross_entropy_with_logits, dice_from_sums,
                                         dice_loss, sigmoid_focal_loss)
from sam3i_jax.losses import packing
from sam3i_jax.losses.matcher import hungarian_match, one_to_many_match
from sam3i_jax.resize import resize_bool_masks

# Loss hyper-parameters of SAM3-I's base.yaml (the same as Meta's SAM 3 recipe).
IOU_AWARE_POS_WEIGHT = 10.0
IOU_AWARE_ALPHA = 0.25  # t = p^alpha * IoU^(1 - alpha)
IOU_AWARE_MIN_TARGET = 0.01
NEGATIVE_GAMMA = 2  # unmatched queries: BCE(x, 0) * p^gamma
PRESENCE_ALPHA, PRESENCE_GAMMA = 0.5, 0
MASK_ALPHA, MASK_GAMMA = 0.25, 2
SEMANTIC_ALPHA, SEMANTIC_GAMMA = 0.6, 2
PAD_NUM_QUERIES = 200  # IABCEMdetr's pad_n_queries

_PRECISION = jax.lax.Precision.HIGHEST  # the pixel sums of the mask terms are matmuls
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)  # replaces padded GT slots, so values there cannot matter
_PER_QUERY_KEYS = ("pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks")

Outputs = Mapping[str, Any]


class DetectionTargets(NamedTuple):
  """GT of a batch (THE BATCH CONTRACT's fields; the batch dict itself may be passed instead).

  boxes: (B, T, 4) cxcywh, normalised by the canvas size.
  target_valid: (B, T) bool, False for padded slots.
  masks: (B, T, H, W) bool, at the prediction resolution or larger (then resized on device).
  """
  boxes: jax.Array
  target_valid: jax.Array
  masks: jax.Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the terms in the total (SAM3-I base.yaml); `o2m` multiplies one-to-many terms."""
  loss_ce: float = 20.0
  presence_loss: float = 20.0
  loss_bbox: float = 5.0
  loss_giou: float = 2.0
  loss_mask: float = 200.0
  loss_dice: float = 10.0
  loss_semantic_seg: float = 20.0
  loss_semantic_dice: float = 30.0
  o2m: float = 2.0


class _Targets(NamedTuple):
  """Targets prepared once per batch: padded slots neutralised, masks flattened at (h, w)."""
  boxes: jax.Array  # (B, T, 4) cxcywh
  boxes_xyxy: jax.Array  # (B, T, 4)
  valid: jax.Array  # (B, T) bool
  visible: jax.Array  # (B,) bool: the prompt has a valid GT box with w > 0 and h > 0
  masks: jax.Array  # (B, T, h * w) float32, zero in padded slots
  pair_normaliser: jax.Array  # () float32, N * num_replicas: pair sums over the global batch
  # divided by it are the replica average of the reference's per-replica sums / N


def _valid_boxes(boxes: jax.Array, target_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(boxes with padded slots replaced by a dummy box, valid as bool)."""
  valid = jnp.asarray(target_valid).astype(bool)
  return jnp.where(valid[..., None], jnp.asarray(boxes, jnp.float32),
                   jnp.asarray(_DUMMY_BOX, jnp.float32)), valid


def _prepare_targets(targets: DetectionTargets, mask_size: Sequence[int],
                     num_replicas: int) -> _Targets:
  boxes, valid = _valid_boxes(targets.boxes, targets.target_valid)
  visible = jnp.any(valid & (boxes[..., 2] > 0) & (boxes[..., 3] > 0), axis=-1)
  masks = resize_bool_masks(jnp.asarray(targets.masks), mask_size) & valid[..., None, None]
  num_boxes = jnp.maximum(valid.sum().astype(jnp.float32) / num_replicas, 1.0)
  return _Targets(boxes, box_cxcywh_to_xyxy(boxes), valid, visible,
                  masks.reshape(masks.shape[:2] + (-1,)).astype(jnp.float32),
                  num_boxes * num_replicas)


class _Branch(NamedTuple):
  """One set of predictions the reference supervises, with how it is matched and weighted."""
  suffix: str
  out: Outputs
  one_to_many: bool  # matched by the one-to-many matcher (else Hungarian)
  weight: float  # multiplies every term (the o2m weight for one-to-many queries)
  with_masks: bool  # the Masks loss applies (last layer, when masks are predicted)


def _branches(outputs: Outputs, o2m_weight: float) -> list[_Branch]:
  """The last layer, then aux layers 0..L-2; each followed by its one-to-many queries if any."""
  aux = list(outputs.get("aux_outputs", ()))
  aux_o2m = list(outputs.get("aux_outputs_o2m", [{}] * len(aux)))
  if len(aux_o2m) != len(aux):
    raise ValueError(f"{len(aux)} aux_outputs but {len(aux_o2m)} aux_outputs_o2m")
  layers = [("", outputs, False)] + [
    (f"_aux_{i}", {**layer, **layer_o2m}, True)
    for i, (layer, layer_o2m) in enumerate(zip(aux, aux_o2m))]
  branches = []
  for suffix, out, is_aux in layers:
    branches.append(_Branch(suffix, out, False, 1.0, not is_aux and "pred_masks" in out))
    if "pred_logits_o2m" in out:
      o2m = {k: out[f"{k}_o2m"] for k in _PER_QUERY_KEYS if f"{k}_o2m" in out}
      branches.append(_Branch(f"{suffix}_o2m", o2m, not is_aux, o2m_weight,
                              not is_aux and "pred_masks" in o2m))
  return branches


def _assignments(branches: list[_Branch], boxes: jax.Array, valid: jax.Array,
                 packed: bool = False) -> list[jax.Array]:
  """(B, Q, T) bool query-to-GT assignment of every branch; the Hungarian problems of all
  branches are solved in one batched call (`packed`: see `hungarian_match`)."""
  hungarian = [b for b in branches if not b.one_to_many]
  solved = []
  if hungarian:
    match = hungarian_match(
      jnp.concatenate([b.out["pred_logits"] for b in hungarian]),
      jnp.concatenate([b.out["pred_boxes"] for b in hungarian]),
      jnp.tile(boxes, (len(hungarian), 1, 1)), jnp.tile(valid, (len(hungarian), 1)),
      packed=packed)
    num_queries = hungarian[0].out["pred_logits"].shape[1]
    assigned = match.query_for_gt[:, None, :] == jnp.arange(num_queries)[:, None]
    solved = list(jnp.split(assigned, len(hungarian)))
  return [one_to_many_match(b.out["pred_logits"], b.out["pred_boxes"], boxes, valid)
          if b.one_to_many else solved.pop(0) for b in branches]


def branch_assignments(outputs: Outputs, boxes: jax.Array,
                       target_valid: jax.Array) -> dict[str, jax.Array]:
  """The matching alone, as `detection_loss` does it: term suffix ("", "_o2m", "_aux_0", ...)
  -> (B, Q, T) bool query-to-GT assignment of that prediction set (for measuring its cost)."""
  boxes, valid = _valid_boxes(boxes, target_valid)
  branches = _branches(outputs, 1.0)
  return {b.suffix: a for b, a in zip(branches, _assignments(branches, boxes, valid))}


def _box_terms(out: Outputs, tg: _Targets, assign: jax.Array) -> dict[str, jax.Array]:
  l1 = jnp.abs(out["pred_boxes"][..., :, None, :] - tg.boxes[..., None, :, :]).sum(-1)
  giou = generalized_box_iou(out["pred_boxes_xyxy"], tg.boxes_xyxy)
  return {"loss_bbox": jnp.where(assign, l1, 0).sum() / tg.pair_normaliser,
          "loss_giou": jnp.where(assign, 1 - giou, 0).sum() / tg.pair_normaliser}


def _classification_terms(out: Outputs, tg: _Targets, assign: jax.Array,
                          pad_num_queries: int | None,
                          iou_aware: bool = True) -> dict[str, jax.Array]:
  """IABCEMdetr: IoU-aware BCE over all queries, and the presence focal loss if predicted.
  `iou_aware=False`: a matched query's target is 1 (see `detection_loss`)."""
  logits = out["pred_logits"][..., 0]  # (B, Q)
  batch, num_queries = logits.shape
  prob = jax.nn.sigmoid(logits)
  positive = assign.any(-1)
  iou = box_iou(jax.lax.stop_gradient(out["pred_boxes_xyxy"]), tg.boxes_xyxy)  # (B, Q, T)
  quality = (jax.lax.stop_gradient(prob)[..., None] ** IOU_AWARE_ALPHA
             * iou ** (1 - IOU_AWARE_ALPHA))
  slot = jnp.argmax(jnp.where(assign, jnp.arange(assign.shape[-1]), -1), axis=-1)
  soft_target = jnp.take_along_axis(quality, slot[..., None], axis=-1)[..., 0]
  if not iou_aware:
    soft_target = jnp.ones_like(soft_target)
  soft_target = jax.lax.stop_gradient(
    jnp.where(positive, jnp.maximum(soft_target, IOU_AWARE_MIN_TARGET), 0.0))
  loss = jnp.where(
    positive,
    binary_cross_entropy_with_logits(logits, soft_target) * IOU_AWARE_POS_WEIGHT,
    binary_cross_entropy_with_logits(logits, 0.0) * prob ** NEGATIVE_GAMMA)
  loss = jnp.where(tg.visible[:, None], loss, 0.0)
  terms = {"loss_ce": loss.sum() / (batch * max(num_queries, pad_num_queries or 0))}
  if "presence_logit" in out:
    presence = out["presence_logit"].reshape(batch)
    terms["presence_loss"] = sigmoid_focal_loss(
      presence, tg.visible.astype(jnp.float32), PRESENCE_ALPHA, PRESENCE_GAMMA).mean()
  return terms


def _mask_terms(pred_masks: jax.Array, tg: _Targets, assign: jax.Array) -> dict[str, jax.Array]:
  """Focal and dice losses of every (query, GT) pair at once: the pixel sums are matmuls, so
  one-to-many assignments cost no gathered copies of the masks."""
  logits = pred_masks.reshape(pred_masks.shape[:2] + (-1,))  # (B, Q, P)
  gt = tg.masks  # (B, T, P)
  pair_sum = lambda a, b: jnp.einsum("bqp,btp->bqt", a, b, precision=_PRECISION)
  # binary targets: focal(x, y) = y focal(x, 1) + (1 - y) focal(x, 0), summed without cancellation
  focal = (pair_sum(sigmoid_focal_loss(logits, 1.0, MASK_ALPHA, MASK_GAMMA), gt)
           + pair_sum(sigmoid_focal_loss(logits, 0.0, MASK_ALPHA, MASK_GAMMA), 1 - gt))
  focal = focal / logits.shape[-1]
  prob = jax.nn.sigmoid(logits)
  dice = dice_from_sums(pair_sum(prob, gt), prob.sum(-1)[..., None] + gt.sum(-1)[:, None, :])
  return {"loss_mask": jnp.where(assign, focal, 0).sum() / tg.pair_normaliser,
          "loss_dice": jnp.where(assign, dice, 0).sum() / tg.pair_normaliser}


def _semantic_terms(semantic_seg: jax.Array, tg: _Targets, mask_size: Sequence[int],
                    num_replicas: int) -> dict[str, jax.Array]:
  """SemanticSegCriterion with presence_head: per-prompt losses averaged over the prompts whose
  GT union is not empty, within each replica, then over replicas."""
  batch = semantic_seg.shape[0]
  union = tg.masks.reshape(tg.masks.shape[:2] + tuple(mask_size)).max(axis=1) > 0  # (B, h, w)
  union = resize_bool_masks(union, semantic_seg.shape[-2:]).reshape(batch, -1)
  logits = semantic_seg.reshape(batch, -1)
  target = union.astype(jnp.float32)
  present = union.any(-1).reshape(num_replicas, -1)

  def replica_mean(per_prompt):
    per_prompt = jnp.where(present, per_prompt.reshape(num_replicas, -1), 0.0)
    return (per_prompt.sum(-1) / (present.sum(-1) + 1e-6)).mean()

  return {"loss_semantic_seg": replica_mean(
            sigmoid_focal_loss(logits, target, SEMANTIC_ALPHA, SEMANTIC_GAMMA).mean(-1)),
          "loss_semantic_dice": replica_mean(dice_loss(logits, target))}


def detection_loss(outputs: Outputs, targets: DetectionTargets | Mapping[str, jax.Array], *,
                   weights: LossWeights = LossWeights(), num_replicas: int = 1,
                   pad_num_queries: int | None = PAD_NUM_QUERIES,
                   scale_by_batch_size: bool = True,
                   iou_aware_targets: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SAM 3's training loss of one prompt branch (see the module docstring).

  Args:
    outputs: `Sam3Image` outputs in training mode: pred_logits (B, Q, 1), pred_boxes (B, Q, 4)
      cxcywh, pred_boxes_xyxy, pred_masks (B, Q, h, w), semantic_seg (B, 1, h', w'),
      presence_logit (B, 1); aux_outputs (per-layer dicts, with presence_logit), *_o2m and
      aux_outputs_o2m. Absent entries (eval-mode outputs) just drop their terms.
    targets: `DetectionTargets` or a mapping with its fields (e.g. the batch dict).
    weights: term weights.
    num_replicas: R, the number of data-parallel replicas the reference would split the batch
      into (contiguous groups of B / R prompts); B must be divisible by R.
    pad_num_queries: loss_ce divides by B * max(Q, pad_num_queries) (None: B * Q).
    scale_by_batch_size: multiply the total by sqrt(B / R).
    iou_aware_targets: False gives a matched query the target 1 instead of p^0.25 IoU^0.75 (not
      in the reference). A model trained from scratch settles, while its boxes are still poor,
      on one low score for every query under the IoU-aware target; binary targets separate the
      matched queries (the demo's own SAM 3 pre-training uses them once its boxes are learned).

  Returns:
    (total, terms): float32 scalars; terms by reference name (one-to-many terms include the o2m
    weight), total = scale * sum of weight * term.
  """
  if not isinstance(targets, DetectionTargets):
    targets = DetectionTargets(*(targets[k] for k in DetectionTargets._fields))
  batch = targets.boxes.shape[0]
  if batch % num_replicas:
    raise ValueError(f"batch {batch} is not divisible by num_replicas={num_replicas}")
  outputs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(outputs))
  targets = DetectionTargets(*(jnp.asarray(x) for x in targets))
  order = packing.valid_first(targets.target_valid)

  slot_loss = functools.partial(
    _slot_loss, weights=weights, num_replicas=num_replicas, pad_num_queries=pad_num_queries,
    scale_by_batch_size=scale_by_batch_size, iou_aware_targets=iou_aware_targets)

  def on_first(k: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    # checkpointed: a switch branch that kept residuals of its own would hold them beside every
    # other branch's; this way only the shared inputs are kept and the branch is recomputed
    return jax.checkpoint(lambda out, tg, order: slot_loss(
      out, DetectionTargets(*(packing.gather_slots(x, order[:, :k]) for x in tg))))(
        outputs, targets, order)

  # every term sums over valid slots only, and packing keeps them in slot order (the order the
  # one-to-many classification target depends on), so the first k slots give the same loss
  return packing.by_valid_count(targets.target_valid, on_first, packing.LOSS_SLOT_SIZES)


def _slot_loss(outputs: Outputs, targets: DetectionTargets, *, weights: LossWeights,
               num_replicas: int, pad_num_queries: int | None, scale_by_batch_size: bool,
               iou_aware_targets: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`detection_loss` on the given slots."""
  batch = targets.boxes.shape[0]
  mask_size = (outputs["pred_masks"] if "pred_masks" in outputs
               else outputs["semantic_seg"]).shape[-2:]
  tg = _prepare_targets(targets, mask_size, num_replicas)

  terms: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)

  def add(new_terms: dict[str, jax.Array], suffix: str = "", scale: float = 1.0) -> None:
    nonlocal total
    for name, value in new_terms.items():
      terms[name + suffix] = value * scale
      total = total + getattr(weights, name) * terms[name + suffix]

  branches = _branches(outputs, weights.o2m)
  for branch, assign in zip(branches, _assignments(branches, tg.boxes, tg.valid, packed=True)):
    add(_box_terms(branch.out, tg, assign), branch.suffix, branch.weight)
    add(_classification_terms(branch.out, tg, assign, pad_num_queries, iou_aware_targets),
        branch.suffix, branch.weight)
    if branch.with_masks:
      add(_mask_terms(branch.out["pred_masks"], tg, assign), branch.suffix, branch.weight)
  if "semantic_seg" in outputs:
    add(_semantic_terms(outputs["semantic_seg"], tg, mask_size, num_replicas))
  if scale_by_batch_size:
    total = total * np.sqrt(batch / num_replicas)
  return total, terms
