"""RoI Align (torchvision.ops.roi_align semantics) for NHWC features, jit-compatible.

Matches torchvision's C++/CUDA kernel (csrc/ops/cpu/roi_align_common.h), not its pure-PyTorch
fallback where the two differ:
  - a sampling point outside [-1, H] x [-1, W] weighs 0; inside, y (x) is clamped to 0 from
    below, and a point with floor(y) >= H - 1 reads row H - 1 only;
  - each output bin averages a grid of ceil(roi_h / out_h) x ceil(roi_w / out_w) points
    (`sampling_ratio <= 0`, adaptive) or sampling_ratio^2 points, divided by max(count, 1).

The adaptive grid size depends on the data, so the number of samples per bin and axis has a
static upper bound `max_samples_per_bin` and unused samples are masked. The default bound,
ceil((max(H, W) + 1) / out), makes the result exact for every box whose extent (in feature
pixels, after `spatial_scale`) is at most max(H, W) + 1 along both axes, i.e. any box of
normalised width/height <= 1, whether or not it crosses the border. For a larger box the grid
size along that axis is clipped to the bound: the bin is then averaged over `bound` evenly
spread points instead of ceil(roi / out) (a close but not identical value).

Bilinear sampling is separable and so is the out-of-bounds rule, so the average over a bin's
sample grid is Wy @ F @ Wx^T with per-axis interpolation matrices Wy (out, H) and Wx (out, W):
no gathers, and memory O(B N out (H + W) C) rather than one value per sample point.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def default_max_samples(height: int, width: int, output_size: int) -> int:
  """The static per-axis sample bound used when `max_samples_per_bin` is None."""
  return max(1, math.ceil((max(height, width) + 1) / output_size))


def _axis_weights(start, bin_size, grid, size: int, output_size: int, num_samples: int):
  """Interpolation matrix (..., output_size, size) of one axis: the summed bilinear weights of
  the bin's used, in-bounds sample points (not yet divided by the sample count).

  start, bin_size: (...,) float32; grid: (...,) float32 number of samples per bin (>= 0).
  """
  p = jnp.arange(output_size, dtype=jnp.float32)
  i = jnp.arange(num_samples, dtype=jnp.float32)
  # Same operation order as torchvision so that floor() sees the same float32 values.
  step = (bin_size / jnp.maximum(grid, 1.0))[..., None, None]
  coord = (start[..., None, None] + p[:, None] * bin_size[..., None, None]
           + (i + 0.5) * step)  # (..., P, S)
  used = i < grid[..., None, None]
  inside = (coord >= -1.0) & (coord <= size)
  c = jnp.maximum(coord, 0.0)
  low = jnp.floor(c)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  c = jnp.where(at_edge, low, c)
  frac = c - low
  keep = (used & inside).astype(jnp.float32)
  cells = jnp.arange(size, dtype=jnp.float32)
  w = ((1.0 - frac)[..., None] * (low[..., None] == cells)
       + frac[..., None] * (high[..., None] == cells))  # (..., P, S, size)
  return jnp.sum(keep[..., None] * w, axis=-2)


def roi_align(features: jax.Array, boxes_xyxy: jax.Array, output_size: int,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              max_samples_per_bin: int | None = None) -> jax.Array:
  """RoI Align of N boxes per image.

  Args:
    features: (B, H, W, C).
    boxes_xyxy: (B, N, 4) as (x1, y1, x2, y2) in input units; `spatial_scale` maps them to
      feature pixels (pixel i covers [i, i + 1), so its centre is i + 0.5 with aligned=True).
    output_size: bins per side.
    spatial_scale, sampling_ratio, aligned: as torchvision.ops.roi_align.
    max_samples_per_bin: static per-axis bound on adaptive sampling (see the module docstring);
      ignored when sampling_ratio > 0.

  Returns:
    (B, N, output_size, output_size, C) in the features' dtype.
  """
  _, height, width, _ = features.shape
  b = boxes_xyxy.astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (b[..., k] * spatial_scale - offset for k in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  bin_h, bin_w = roi_h / output_size, roi_w / output_size
  if sampling_ratio > 0:
    num_samples = sampling_ratio
    grid_h = grid_w = jnp.full(b.shape[:-1], float(sampling_ratio), jnp.float32)
  else:
    num_samples = max_samples_per_bin or default_max_samples(height, width, output_size)
    # ceil(roi / out) recomputed from the bin size, as the kernel does; clipped to the bound.
    grid_h = jnp.clip(jnp.ceil(roi_h / output_size), 0.0, num_samples)
    grid_w = jnp.clip(jnp.ceil(roi_w / output_size), 0.0, num_samples)
  wy = _axis_weights(y1, bin_h, grid_h, height, output_size, num_samples)  # (B, N, P, H)
  wx = _axis_weights(x1, bin_w, grid_w, width, output_size, num_samples)  # (B, N, P, W)
  # count = max(grid_h * grid_w, 1); with at least one axis empty there is nothing to divide.
  scale = 1.0 / jnp.maximum(grid_h * grid_w, 1.0)
  wy = wy * scale[..., None, None]
  prec = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("bnph,bhwc->bnpwc", wy.astype(features.dtype), features, precision=prec)
  return jnp.einsum("bnqw,bnpwc->bnpqc", wx.astype(features.dtype), rows, precision=prec)
