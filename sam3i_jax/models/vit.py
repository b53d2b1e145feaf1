"""The SAM 3 vision trunk: a ViTDet-style ViT with 2-D axial RoPE (sam3/model/vitdet.py).

Attribute names mirror `backbone.vision_backbone.trunk.*` of the PyTorch checkpoint. The RoPE
tables (`freqs_cis` buffers there) are not parameters here: they depend only on shapes and are
recomputed in float32 as NumPy constants.

Layout: images (B, H, W, 3) in [-1, 1]; tokens stay a (B, g, g, C) map through every block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import (conv, dense, dot_product_attention, dropout_layer, gelu,
                                     layer_norm, run_block)

ROPE_THETA = 10000.0


# --- 2-D axial RoPE ------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def rope_tables(head_dim: int, height: int, width: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (height * width, head_dim // 2) float32, for row-major tokens of a grid.

  Token t sits at x = (t % width) * scale, y = (t // width) * scale. Rotation pair j (channels
  2j, 2j+1) turns by x * f_j for the first head_dim // 4 pairs and by y * f_j for the rest, with
  f_j = theta^(-4j / head_dim) (compute_axial_cis of the reference).
  """
  if head_dim % 4:
    raise ValueError(f"2-D axial RoPE needs head_dim % 4 == 0, got {head_dim}")
  freqs = (1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, head_dim, 4, dtype=np.float32)[: head_dim // 4]
                                              / np.float32(head_dim)))).astype(np.float32)
  t = np.arange(height * width)
  t_x = (t % width).astype(np.float32) * np.float32(scale)
  t_y = (t // width).astype(np.float32) * np.float32(scale)
  angles = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1).astype(np.float32)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
  """Rotates adjacent channel pairs of x (N, L, H, Dh) by the (L, Dh/2) angles, in float32."""
  dtype = x.dtype
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  a, b = xf[..., 0], xf[..., 1]
  c, s = jnp.asarray(cos)[:, None, :], jnp.asarray(sin)[:, None, :]  # broadcast over heads
  out = jnp.stack([a * c - b * s, a * s + b * c], axis=-1)
  return out.reshape(x.shape).astype(dtype)


# --- windows ----------------------------------------------------------------------------------
def window_partition(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) -> (B * H/w * W/w, w, w, C), windows in row-major order; H, W multiples of w."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c)


def window_unpartition(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of window_partition: (B * nh * nw, w, w, C) -> (B, H, W, C)."""
  nh, nw = height // window, width // window
  c = windows.shape[-1]
  x = windows.reshape(-1, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


def tiled_abs_pos(pos_embed: jax.Array, height: int, width: int) -> jax.Array:
  """(1, 1 + P*P, C) -> (height, width, C): drop the cls row and tile the P x P grid (then crop)."""
  grid = pos_embed[0, 1:]
  p = int(round(np.sqrt(grid.shape[0])))
  if p * p != grid.shape[0]:
    raise ValueError(f"pos_embed has {grid.shape[0]} grid rows, not a square")
  grid = grid.reshape(p, p, -1)
  reps = (-(-height // p), -(-width // p), 1)
  return jnp.tile(grid, reps)[:height, :width]


# --- modules ----------------------------------------------------------------------------------
class PatchEmbed(nnx.Module):
  """Non-overlapping patch projection (conv k = s = patch, no bias) -> (B, g, g, C)."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    p = config.patch_size
    self.proj = conv(3, config.vit_dim, p, stride=p, use_bias=False, rngs=rngs,
                     dtype=config.compute_dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.proj(images)


class Attention(nnx.Module):
  """Multi-head self-attention over a (N, h, w, C) token map with fused `qkv` and 2-D RoPE."""

  def __init__(self, dim: int, num_heads: int, rope_scale: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.rope_scale = float(rope_scale)
    self.attention_impl = "auto"  # see layers.dot_product_attention; set_attributes(attention_impl=...)
    self.qkv = dense(dim, 3 * dim, rngs=rngs, dtype=dtype)
    self.proj = dense(dim, dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    qkv = self.qkv(x.reshape(n, h * w, c)).reshape(n, h * w, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    cos, sin = rope_tables(self.head_dim, h, w, self.rope_scale)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, impl=self.attention_impl)  # (N, L, H, Dh)
    return self.proj(out.reshape(n, h, w, c))


class Mlp(nnx.Module):
  """timm's Mlp: fc1 -> exact GELU -> fc2."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = dense(dim, hidden, rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden, dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


def drop_path(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
  """Stochastic depth on (B, H, W, C): one keep/drop draw per sample, kept samples scaled by
  1 / (1 - rate) (timm's DropPath). An nnx.Dropout, so model.train()/eval()/nnx.view toggle it."""
  return dropout_layer(rate, broadcast_dims=(1, 2, 3), rngs=rngs)


class Block(nnx.Module):
  """Pre-norm ViT block; window attention if window_size > 0, else global attention.

  `x += drop_path(attn(norm1(x)))`, `x += drop_path(mlp(norm2(x)))` on (B, H, W, C) maps.
  Each block is its own module so that callers can wrap it with nnx.remat.
  """

  def __init__(self, config: Sam3Config, *, window_size: int, drop_path_rate: float, rngs: nnx.Rngs):
    d, dtype = config.vit_dim, config.compute_dtype
    # Window blocks: positions 0..w-1 inside each window; global blocks: the full grid squeezed
    # to the window's range (scale window / grid; the reference's rope_interp).
    rope_scale = 1.0 if window_size else config.window_size / config.grid_size
    self.window_size = window_size
    self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.attn = Attention(d, config.vit_heads, rope_scale, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(d, config.vit_mlp_dim, rngs=rngs, dtype=dtype)
    self.drop_path = drop_path(drop_path_rate, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, C) -> (B, H, W, C)."""
    shortcut = x
    x = self.norm1(x)
    if self.window_size:
      _, h, w, _ = x.shape
      x = window_unpartition(self.attn(window_partition(x, self.window_size)), self.window_size, h, w)
    else:
      x = self.attn(x)
    x = shortcut + self.drop_path(x)
    return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nnx.Module):
  """The trunk: patch embed + tiled abs pos + ln_pre + blocks; images (B, H, W, 3) -> (B, g, g, C)."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.vit_dim, config.compute_dtype
    self.dtype = dtype
    self.remat = config.remat
    self.patch_embed = PatchEmbed(config, rngs=rngs)
    p = config.pretrain_grid_size
    # Row 0 is the pretraining cls slot: unused, kept so the checkpoint tensor loads as is.
    self.pos_embed = nnx.Param(
        0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (1, 1 + p * p, d), jnp.float32))
    self.ln_pre = layer_norm(d, rngs=rngs, dtype=dtype)
    rates = np.linspace(0.0, config.vit_drop_path_rate, config.vit_depth)
    globals_ = set(config.global_att_blocks)
    self.blocks = nnx.List([
        Block(config, window_size=0 if i in globals_ else config.window_size,
              drop_path_rate=float(rates[i]), rngs=rngs)
        for i in range(config.vit_depth)])

  def embed(self, images: jax.Array) -> jax.Array:
    """Tokens entering block 0: ln_pre(patch_embed(images) + tiled pos_embed), (B, g, g, C)."""
    x = self.patch_embed(images.astype(self.dtype))
    _, h, w, _ = x.shape
    x = x + tiled_abs_pos(self.pos_embed[...], h, w).astype(x.dtype)
    return self.ln_pre(x)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    for block in self.blocks:
      x = run_block(block, self.remat, x)
    return x
