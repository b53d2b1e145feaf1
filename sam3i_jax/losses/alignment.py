"""SAM3-I stage-3 alignment losses between the simple (S) and complex (C) instruction branches.

Ports of the four terms of SAM3-I's `Sam3LossWrapper.forward` (`sam3/train/loss/sam3_loss.py`),
with the weights of `sam3i_3_all.yaml`. Branches A and B are the two instruction levels of the
same example (the reference swaps S and C every epoch; every term is symmetric in A and B).

- `kl_alignment`: symmetric KL between the spatial softmaxes of the semantic-seg logits, each
  direction pulling one branch towards the other's stop-gradient distribution.
- `hard_region_bce`: per-pixel BCE against the union GT mask, weighted by a stop-gradient
  disagreement map of the two branches.
- `instance_infonce`: InfoNCE over the projected instruction features of both branches; the
  positive is the same example's other branch, same-concept negatives are down-weighted.
- `concept_anchor_margin`: the mean S/C feature must be closer to its own concept anchor than to
  the hardest anchor of another concept, by a margin.

Padding examples (`example_valid` False) take no part: they are neither anchors nor negatives and
do not count in any mean; a term with nothing to average is 0.

Data parallelism. Under `jax.jit` with global (sharded) arrays the losses see the whole global
batch, so InfoNCE and the margin use every device's examples (the reference computes them per
GPU, which makes both ~0 with its one example per GPU). Inside `jax.shard_map` (with the default
check_vma) pass the batch axis name(s) as `axis_name`: the contrastive terms all-gather their
inputs, the per-example terms sum over the axes, and every term returns the global-batch value,
device-invariant, whose gradient is that of the global-batch loss. Meshes with Explicit axis types
are not supported (the (2B, 2B) similarity would need an explicit output sharding); the
project's mesh has Auto axes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sam3i_jax.resize import resize_logits
from sam3i_jax.losses.functional import binary_cross_entropy_with_logits

# a mesh axis name, or several (e.g. ("data", "fsdp")) when the batch is split over more than one
AxisName = str | tuple[str, ...] | None

# F.normalize's eps in the reference
_NORM_EPS = 1e-8
# the reference's guard inside the InfoNCE log
_LOG_EPS = 1e-8
# the reference clamps the stop-gradient probabilities of the disagreement weight to [eps, 1-eps]
_PROB_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AlignmentWeights:
  """Loss weights and hyper-parameters (defaults: the released `sam3i_3_all.yaml`)."""
  kl: float = 0.001
  hard: float = 1.0
  infonce: float = 1.0
  margin: float = 1.0
  temperature: float = 0.1
  same_concept_weight: float = 0.5
  anchor_margin: float = 0.2


def _masked_mean(values: jax.Array, valid: jax.Array, axis_name: AxisName) -> jax.Array:
  """Mean of `values` over the True entries of `valid` (across `axis_name` if given); 0 if none."""
  valid = valid.astype(bool)
  total = jnp.sum(jnp.where(valid, values, 0.0))
  count = jnp.sum(valid, dtype=jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0)


def _gather(arrays: tuple[jax.Array, ...], axis_name: AxisName) -> tuple[jax.Array, ...]:
  """All-gather the per-device batch shards along the batch axis (identity without an axis)."""
  if axis_name is None:
    return arrays
  return tuple(jax.lax.all_gather(x, axis_name, tiled=True) for x in arrays)


def _replicated(value: jax.Array, axis_name: AxisName) -> jax.Array:
  """Mark a value computed identically on every device as axis-invariant.

  A loss computed from all-gathered inputs is typed as varying over the axis; differentiating it
  would add up one copy per device. The mean of the identical copies is the same number, typed
  invariant, so its gradient is the global loss's.
  """
  return value if axis_name is None else jax.lax.pmean(value, axis_name)


def _normalize(x: jax.Array) -> jax.Array:
  """F.normalize(x, dim=-1, eps=1e-8), with a finite gradient at x = 0."""
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS ** 2))


def _flat_logits(seg: jax.Array) -> jax.Array:
  """(B, 1, H, W) or (B, H, W) semantic-seg logits -> (B, H*W) float32."""
  return seg.reshape(seg.shape[0], -1).astype(jnp.float32)


def kl_alignment(seg_a: jax.Array, seg_b: jax.Array, example_valid: jax.Array, *,
                 axis_name: AxisName = None) -> jax.Array:
  """Symmetric spatial-softmax KL between the branches' semantic-seg logits (unweighted).

  With P = softmax over all H*W pixels (temperature 1):
    1/2 [KL(sg(P_B) || P_A) + KL(sg(P_A) || P_B)], averaged over the valid examples
  (the reference's F.kl_div(..., reduction="batchmean")).

  Args:
    seg_a, seg_b: (B, 1, H, W) semantic-seg logits of the two branches.
    example_valid: (B,) bool.
    axis_name: the batch mesh axis name(s) when called inside shard_map.
  """
  log_p_a = jax.nn.log_softmax(_flat_logits(seg_a), axis=-1)
  log_p_b = jax.nn.log_softmax(_flat_logits(seg_b), axis=-1)

  def kl_to(target_log_p: jax.Array, log_p: jax.Array) -> jax.Array:
    target_log_p = jax.lax.stop_gradient(target_log_p)
    return jnp.sum(jnp.exp(target_log_p) * (target_log_p - log_p), axis=-1)

  per_example = 0.5 * (kl_to(log_p_b, log_p_a) + kl_to(log_p_a, log_p_b))
  return _masked_mean(per_example, example_valid, axis_name)


def _resize_logits(seg: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, 1, H, W) or (B, H, W) logits -> (B, h, w) float32, resized as the reference does
  (F.interpolate, bilinear, align_corners=False)."""
  seg = seg.reshape(seg.shape[0], *seg.shape[-2:]).astype(jnp.float32)
  if seg.shape[-2:] == tuple(size):
    return seg
  return resize_logits(seg, size)


def hard_region_bce(seg_a: jax.Array, seg_b: jax.Array, union_gt: jax.Array,
                    example_valid: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
  """Disagreement-weighted BCE of both branches against the union GT mask (unweighted).

  Logits are bilinearly resized to the GT size. With p = clamp(sg(sigmoid(logit)), 1e-6,
  1 - 1e-6) and m = (p_A + p_B) / 2, the per-pixel weight is the reference's
    w = 1/2 [m log(m / p_A) + m log(m / p_B)]
  (F.kl_div on the foreground probabilities only, not a Jensen-Shannon divergence). The loss is
    1/2 [mean_hw(w BCE(up(L_A), y)) + mean_hw(w BCE(up(L_B), y))], averaged over valid examples.

  Args:
    seg_a, seg_b: (B, 1, H, W) semantic-seg logits.
    union_gt: (B, Hm, Wm) bool, the union of the example's GT masks (all False for negatives).
    example_valid: (B,) bool.
    axis_name: the batch mesh axis name(s) when called inside shard_map.
  """
  size = union_gt.shape[-2:]
  logits_a = _resize_logits(seg_a, size)
  logits_b = _resize_logits(seg_b, size)
  p_a, p_b = (jnp.clip(jax.nn.sigmoid(jax.lax.stop_gradient(x)), _PROB_EPS, 1 - _PROB_EPS)
              for x in (logits_a, logits_b))
  m = 0.5 * (p_a + p_b)
  weight = 0.5 * (m * (jnp.log(m) - jnp.log(p_a)) + m * (jnp.log(m) - jnp.log(p_b)))
  target = union_gt.astype(jnp.float32)
  bce = (binary_cross_entropy_with_logits(logits_a, target)
         + binary_cross_entropy_with_logits(logits_b, target))
  per_example = 0.5 * jnp.mean(weight * bce, axis=(-2, -1))
  return _masked_mean(per_example, example_valid, axis_name)


def _global_infonce(feat_a: jax.Array, feat_b: jax.Array, concept_id: jax.Array,
                    example_valid: jax.Array, temperature: float,
                    same_concept_weight: float) -> jax.Array:
  """`instance_infonce` on arrays that hold the whole batch."""
  batch = feat_a.shape[0]
  feats = _normalize(jnp.concatenate([feat_a, feat_b], 0).astype(jnp.float32))  # (2B, D)
  sim = feats @ feats.T / temperature
  concept = jnp.concatenate([concept_id, concept_id])
  valid = jnp.concatenate([example_valid, example_valid]).astype(bool)
  rows = jnp.arange(2 * batch)
  is_self = rows[:, None] == rows[None, :]
  is_positive = rows[None, :] == ((rows + batch) % (2 * batch))[:, None]
  same_concept = concept[:, None] == concept[None, :]
  weights = jnp.where(same_concept & ~is_positive, same_concept_weight, 1.0)
  weights = jnp.where(is_self | ~valid[None, :], 0.0, weights)
  # the reference subtracts the detached row max, self-similarity included, which only matters
  # through the 1e-8 inside the log; a row's own column keeps padding rows finite
  row_max = jnp.max(jnp.where(valid[None, :] | is_self, sim, -jnp.inf), axis=1, keepdims=True)
  shifted = sim - jax.lax.stop_gradient(row_max)
  log_denominator = jnp.log(jnp.sum(weights * jnp.exp(shifted), axis=1) + _LOG_EPS)
  positive = jnp.sum(jnp.where(is_positive, shifted, 0.0), axis=1)
  return _masked_mean(log_denominator - positive, valid, None)


def instance_infonce(feat_a: jax.Array, feat_b: jax.Array, concept_id: jax.Array,
                     example_valid: jax.Array, *, temperature: float = 0.1,
                     same_concept_weight: float = 0.5,
                     axis_name: AxisName = None) -> jax.Array:
  """Weighted InfoNCE over the 2B L2-normalised instruction features (unweighted).

  Rows/columns are [A; B]; S = F F^T / temperature. Row i's positive is the same example's other
  branch; its denominator sums w_ij exp(S_ij) over every other valid column j (self excluded), with
  w = same_concept_weight for columns of the same concept and 1 otherwise (the positive: 1).
    L = mean over valid rows of [log(sum_j w_ij exp(S_ij - max_i) + 1e-8) - (S_i,pos - max_i)].
  A lone example gives ~0 (its positive is its only column).

  Args:
    feat_a, feat_b: (B, D) projected instruction features of the two branches.
    concept_id: (B,) int, equal iff the examples' concept strings are equal.
    example_valid: (B,) bool.
    temperature, same_concept_weight: the reference's 0.1 and rho = 0.5.
    axis_name: the batch mesh axis name(s) inside shard_map (the inputs are all-gathered).
  """
  gathered = _gather((feat_a, feat_b, concept_id, example_valid), axis_name)
  loss = _global_infonce(*gathered, temperature, same_concept_weight)
  return _replicated(loss, axis_name)


def _global_anchor_margin(feat_a: jax.Array, feat_b: jax.Array, anchors: jax.Array,
                          concept_id: jax.Array, example_valid: jax.Array,
                          margin: float) -> jax.Array:
  """`concept_anchor_margin` on arrays that hold the whole batch."""
  query = _normalize((feat_a.astype(jnp.float32) + feat_b.astype(jnp.float32)) / 2)
  anchors = _normalize(anchors.astype(jnp.float32))
  sim = query @ anchors.T  # (B, B): example i against the anchor of example j
  valid = example_valid.astype(bool)
  negative = (concept_id[:, None] != concept_id[None, :]) & valid[None, :]
  has_negative = jnp.any(negative, axis=1)
  hardest = jnp.max(jnp.where(negative, sim, -jnp.inf), axis=1)
  hardest = jnp.where(has_negative, hardest, 0.0)
  per_example = jax.nn.relu(hardest - jnp.diagonal(sim) + margin)
  return _masked_mean(per_example, valid & has_negative, None)


def concept_anchor_margin(feat_a: jax.Array, feat_b: jax.Array, anchors: jax.Array,
                          concept_id: jax.Array, example_valid: jax.Array, *,
                          margin: float = 0.2, axis_name: AxisName = None) -> jax.Array:
  """Hardest-negative margin between instruction features and concept anchors (unweighted).

  s_i = normalize((f_A,i + f_B,i) / 2), c_j = normalize(anchor_j).
    L = mean over valid i with >= 1 valid other-concept anchor of
        relu(max_{j: concept_j != concept_i} s_i.c_j - s_i.c_i + margin);
  0 if there is no such i. Gradients reach both branches and the anchors (as in the reference).

  Args:
    feat_a, feat_b: (B, D) projected instruction features.
    anchors: (B, D) projected concept features (the concept-level text path).
    concept_id: (B,) int, equal iff the concept strings are equal.
    example_valid: (B,) bool.
    margin: the reference's m = 0.2.
    axis_name: the batch mesh axis name(s) inside shard_map (the inputs are all-gathered).
  """
  gathered = _gather((feat_a, feat_b, anchors, concept_id, example_valid), axis_name)
  loss = _global_anchor_margin(*gathered, margin)
  return _replicated(loss, axis_name)


def alignment_losses(seg_a: jax.Array, seg_b: jax.Array, union_gt: jax.Array,
                     feat_a: jax.Array, feat_b: jax.Array, anchors: jax.Array,
                     concept_id: jax.Array, example_valid: jax.Array,
                     weights: AlignmentWeights = AlignmentWeights(), *,
                     axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage-3 alignment objective: -> (total, {"kl", "hard", "infonce", "margin"}).

  The dict holds the weighted terms (as the reference logs them); total is their sum. Shapes as
  in the four term functions; `axis_name` as there.
  """
  terms = {
    "kl": weights.kl * kl_alignment(seg_a, seg_b, example_valid, axis_name=axis_name),
    "hard": weights.hard * hard_region_bce(seg_a, seg_b, union_gt, example_valid,
                                           axis_name=axis_name),
    "infonce": weights.infonce * instance_infonce(
      feat_a, feat_b, concept_id, example_valid, temperature=weights.temperature,
      same_concept_weight=weights.same_concept_weight, axis_name=axis_name),
    "margin": weights.margin * concept_anchor_margin(
      feat_a, feat_b, anchors, concept_id, example_valid, margin=weights.anchor_margin,
      axis_name=axis_name),
  }
  return sum(terms.values()), terms
