"""Sine position encodings of SAM 3 (sam3/model/position_encoding.py, model_misc.py).

All computed in float32; they carry no parameters.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

TEMPERATURE = 10000.0


def _dim_t(num_feats: int) -> np.ndarray:
  i = np.arange(num_feats, dtype=np.float32)
  return (TEMPERATURE ** (2 * (i // 2) / num_feats)).astype(np.float32)


def _interleave(v, num_feats: int):
  """v (...,) -> (..., num_feats): sin on even, cos on odd frequencies, interleaved."""
  pos = v[..., None] / jnp.asarray(_dim_t(num_feats))
  return jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1).reshape(
      *pos.shape[:-1], num_feats)


def sine_map(height: int, width: int, dim: int) -> np.ndarray:
  """The (H, W, dim) map of PositionEmbeddingSine(dim, normalize=True): cat(pos_y, pos_x).

  A constant of the shapes alone, so it is computed once in NumPy (float32 like the reference).
  """
  f = dim // 2
  scale = np.float32(2 * math.pi)
  y = np.arange(1, height + 1, dtype=np.float32)
  x = np.arange(1, width + 1, dtype=np.float32)
  y = y / (y[-1] + np.float32(1e-6)) * scale
  x = x / (x[-1] + np.float32(1e-6)) * scale
  dim_t = _dim_t(f)

  def enc(v):
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(v), f)

  pos_y = np.broadcast_to(enc(y)[:, None, :], (height, width, f))
  pos_x = np.broadcast_to(enc(x)[None, :, :], (height, width, f))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


def encode_boxes(boxes_cxcywh, dim: int):
  """Box prompt encoding (encode_boxes): (..., 4) -> (..., dim + 2) = cat(y(cy), x(cx), h, w).

  Unlike the map form the coordinates are not normalised again: v * 2pi / dim_t.
  """
  f = dim // 2
  b = boxes_cxcywh.astype(jnp.float32)
  scale = 2 * math.pi
  pos_x = _interleave(b[..., 0] * scale, f)
  pos_y = _interleave(b[..., 1] * scale, f)
  return jnp.concatenate([pos_y, pos_x, b[..., 3:4], b[..., 2:3]], axis=-1)


def encode_points(points_xy, labels, dim: int):
  """Point prompt encoding (encode_points): cat(y, x, label) -> (..., dim + 1)."""
  f = dim // 2
  p = points_xy.astype(jnp.float32)
  scale = 2 * math.pi
  return jnp.concatenate([_interleave(p[..., 1] * scale, f), _interleave(p[..., 0] * scale, f),
                          labels[..., None].astype(jnp.float32)], axis=-1)


def query_sine_embed(boxes_cxcywh, num_feats: int):
  """gen_sineembed_for_position for 4-d boxes: (..., 4) -> (..., 2 * num_feats) =
  cat(pos(cy), pos(cx), pos(w), pos(h)), each num_feats // 2 wide, scale 2pi."""
  f = num_feats // 2
  b = boxes_cxcywh.astype(jnp.float32) * (2 * math.pi)
  parts = [_interleave(b[..., i], f) for i in (1, 0, 2, 3)]
  return jnp.concatenate(parts, axis=-1)
