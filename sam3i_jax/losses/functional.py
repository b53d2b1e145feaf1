"""Elementwise loss primitives shared by the SAM 3 detection and the SAM3-I alignment losses.

Each follows the formula of its PyTorch counterpart (`F.binary_cross_entropy_with_logits`,
`sam3.train.loss.loss_fns.sigmoid_focal_loss` without Triton, `loss_fns.dice_loss`) so that
float32 results agree to rounding; reductions are left to the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array,
                                     pos_weight: jax.Array | float | None = None) -> jax.Array:
  """Elementwise BCE with logits, torch's formula: (1 - y) x - w log sigmoid(x).

  w = 1 + (pos_weight - 1) y scales the positive term (w = 1 without pos_weight). Targets may
  be soft (in [0, 1]). Shapes broadcast; returns the broadcast shape.
  """
  log_sigmoid = jax.nn.log_sigmoid(logits)
  if pos_weight is not None:
    log_sigmoid = log_sigmoid * (1 + (pos_weight - 1) * targets)
  return (1 - targets) * logits - log_sigmoid


def _exponent(gamma: float) -> float | int:
  # an integral exponent as an int: x ** 0 then has gradient 0 at x = 0 (a float 0.0 gives NaN)
  # and x ** 2 is x * x, as torch computes it
  return int(gamma) if float(gamma).is_integer() else gamma


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float,
                       gamma: float) -> jax.Array:
  """Elementwise sigmoid focal loss (RetinaNet): alpha_t (1 - p_t)^gamma BCE(x, y).

  p = sigmoid(x), p_t = p y + (1 - p)(1 - y), alpha_t = alpha y + (1 - alpha)(1 - y); a negative
  alpha disables the alpha weighting, as in the reference. Shapes broadcast.
  """
  prob = jax.nn.sigmoid(logits)
  loss = binary_cross_entropy_with_logits(logits, targets)
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = loss * (1 - p_t) ** _exponent(gamma)
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def dice_from_sums(intersection: jax.Array, total: jax.Array) -> jax.Array:
  """Soft dice loss from its sums: 1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1).

  For callers that form the sums themselves (e.g. for every prediction/target pair at once).
  """
  return 1 - (2 * intersection + 1) / (total + 1)


def dice_loss(logits: jax.Array, targets: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
  """Soft dice loss 1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), p = sigmoid(logits).

  Sums run over `axis` (default the last); returns the remaining dimensions, one loss per mask.
  """
  prob = jax.nn.sigmoid(logits)
  return dice_from_sums(jnp.sum(prob * targets, axis=axis),
                        jnp.sum(prob, axis=axis) + jnp.sum(targets, axis=axis))
