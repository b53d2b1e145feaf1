"""Bilinear resizing exactly as PyTorch's CPU `F.interpolate(mode="bilinear",
align_corners=False)` (no antialias, even when shrinking): one home for the taps, used by the
post-processing (mask logits to the image), the alignment losses (logits to the target size) and
the detection losses (boolean target masks to the prediction size).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """(index0, index1, lambda0, lambda1) along one axis.

  Source coordinate (i + 0.5) * in/out - 0.5, clamped at 0; the upper neighbour is clamped to
  the last pixel. Rounded as torch's CPU kernel does for float32 inputs (float32 scale,
  float64 arithmetic, float32 result): near 288 -> 1008 a plain float32 or float64 coordinate
  moves the logits by up to 5e-5 / 3e-4, and e.g. 9 -> 31 at i = 15 gives 3.9999998, not 4, so
  both neighbours count.
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


def resize_logits_np(masks: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
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


def resize_logits(masks: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Jittable: float32 (..., h, w) -> (..., H, W), the same taps as `resize_logits_np`; XLA decides
  on FMA contraction, so values may differ from torch by an ulp or so."""
  masks = jnp.asarray(masks, jnp.float32)
  (h, w), (out_h, out_w) = masks.shape[-2:], tuple(out_hw)
  x0, x1, wx0, wx1 = bilinear_taps(w, out_w)
  y0, y1, wy0, wy1 = bilinear_taps(h, out_h)
  rows = jnp.take(masks, x0, axis=-1) * wx0 + jnp.take(masks, x1, axis=-1) * wx1
  return jnp.take(rows, y0, axis=-2) * wy0[:, None] + jnp.take(rows, y1, axis=-2) * wy1[:, None]


def resize_bool_masks(masks, size: Sequence[int]):
  """Boolean masks (..., H, W) -> (..., h, w) as `F.interpolate(masks.float(), size, "bilinear",
  align_corners=False).bool()`: an output pixel is True iff a source pixel with a non-zero bilinear
  weight is True. Exact, with boolean gathers (no float image); NumPy in, NumPy out (host-side
  pipelines), or JAX arrays (jit-able, static sizes)."""
  xp = np if isinstance(masks, np.ndarray) else jnp
  masks = masks.astype(bool)
  for axis, out_size in ((-2, size[0]), (-1, size[1])):
    in_size = masks.shape[axis]
    if in_size == out_size:
      continue
    first, second, _, weight = bilinear_taps(in_size, out_size)
    second_counts = (weight > 0).reshape((-1, 1) if axis == -2 else (-1,))
    masks = xp.take(masks, first, axis=axis) | (xp.take(masks, second, axis=axis) & second_counts)
  return masks
