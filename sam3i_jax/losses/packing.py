"""Padded target slots packed valid-first, so that work can be sized by the real targets.

A batch carries T target slots per example (the recipe's 200), most of them padding. Packing the
valid slots first (a stable order, so the valid slots keep their relative order) puts every valid
target of every example within the first k slots, k the batch's largest valid count; the losses
and the matcher then run on those k slots only. Shapes must be static, so k is rounded up to one
of a few sizes and `by_valid_count` picks the matching `lax.switch` branch: a batch pays for its
largest valid count rounded up, not for T.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# Slot counts the valid targets are packed into (T itself is always the last size). The matcher
# uses every size; the loss only one below T, since each size is another copy of the whole loss
# and its gradient in the compiled step (with all five sizes the deviceless TPU compile of the
# full-size stage-3 step took 716 s; with these two 452 s, and 481 s before any packing).
SLOT_SIZES = (8, 32, 64, 128)
LOSS_SLOT_SIZES = (32,)


def valid_first(valid: jax.Array) -> jax.Array:
  """(B, T) bool -> (B, T) int32 slot order: valid slots first, each group in slot order."""
  return jnp.argsort(~valid.astype(bool), axis=-1, stable=True).astype(jnp.int32)


def gather_slots(x: jax.Array, order: jax.Array) -> jax.Array:
  """x (B, T, ...) -> (B, T', ...): the slots `order` (B, T') of each example (whole slots are
  copied, so a (B, T, H, W) mask array costs one row copy per slot taken)."""
  return x[jnp.arange(x.shape[0])[:, None], order]


def sizes(num_slots: int, slot_sizes: tuple[int, ...] = SLOT_SIZES) -> tuple[int, ...]:
  """The packed sizes for T = num_slots, ascending, T the last."""
  return tuple(sorted({min(k, num_slots) for k in slot_sizes} | {num_slots}))


def by_valid_count(valid: jax.Array, branch: Callable[[int], Any],
                   slot_sizes: tuple[int, ...] = SLOT_SIZES) -> Any:
  """branch(k) for k the smallest of `sizes(T, slot_sizes)` that holds the batch's largest
  valid count.

  One `lax.switch` branch per size (just `branch(T)` when T is the only size); `branch(k)`
  must give the same structure for every k.
  """
  options = sizes(valid.shape[-1], slot_sizes)
  if len(options) == 1:
    return branch(options[0])
  most = valid.astype(jnp.int32).sum(-1).max()
  index = jnp.searchsorted(jnp.asarray(options), most)  # the first size >= most
  return jax.lax.switch(index, [lambda k=k: branch(k) for k in options])
