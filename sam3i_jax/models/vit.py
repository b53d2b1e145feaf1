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
from sam3i_jax.models.layers import conv, dense, dot_product_attention, gelu, layer_norm
from sam3i_jax.models.stacking import scan_layers, stack_layers

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

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attention_impl = "auto"  # see layers.dot_product_attention; set_attributes(attention_impl=...)
    self.qkv = dense(dim, 3 * dim, rngs=rngs, dtype=dtype)
    self.proj = dense(dim, dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, rope_scale: float) -> jax.Array:
    n, h, w, c = x.shape
    qkv = self.qkv(x.reshape(n, h * w, c)).reshape(n, h * w, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    cos, sin = rope_tables(self.head_dim, h, w, float(rope_scale))
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


class DropPath(nnx.Module):
  """Stochastic depth on (B, H, W, C): one keep/drop draw per sample, kept samples scaled by
  1 / (1 - rate) (timm's DropPath). The keep probability is a call argument, so the blocks of a
  stack (each with its own rate) share one structure; `deterministic` follows train()/eval()."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.rngs = rngs["dropout"].fork()
    self.deterministic = True  # inactive until model.train(), like layers.dropout_layer

  def __call__(self, x: jax.Array, keep: jax.Array | float) -> jax.Array:
    """keep: the keep probability, 1 - rate (float32, as nnx.Dropout computes it)."""
    if self.deterministic:
      return x
    keep = jnp.asarray(keep, jnp.float32)
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    keep = jnp.where(keep > 0, keep, 1.0).astype(x.dtype)  # rate 1: zeros with finite gradients
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


class Block(nnx.Module):
  """Pre-norm ViT block; window attention, or global attention over the whole grid.

  `x += drop_path(attn(norm1(x)))`, `x += drop_path(mlp(norm2(x)))` on (B, H, W, C) maps.
  Window and global blocks share their structure (the kind and the drop-path rate are call
  arguments), so the trunk stacks all of them and scans.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.vit_dim, config.compute_dtype
    self.window_size = config.window_size
    # Window blocks: positions 0..w-1 inside each window; global blocks: the full grid squeezed
    # to the window's range (scale window / grid; the reference's rope_interp).
    self.global_rope_scale = config.window_size / config.grid_size
    self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.attn = Attention(d, config.vit_heads, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(d, config.vit_mlp_dim, rngs=rngs, dtype=dtype)
    self.drop_path = DropPath(rngs=rngs)

  def window_attention(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    windows = window_partition(x, self.window_size)
    return window_unpartition(self.attn(windows, 1.0), self.window_size, h, w)

  def __call__(self, x: jax.Array, drop_path_keep: jax.Array | float = 1.0,
               global_attention: jax.Array | bool = False) -> jax.Array:
    """x (B, H, W, C) -> (B, H, W, C); drop_path_keep: 1 - this block's drop-path rate;
    global_attention may be traced (lax.cond)."""
    shortcut = x
    x = self.norm1(x)
    if isinstance(global_attention, (bool, np.bool_)):
      x = self.attn(x, self.global_rope_scale) if global_attention else self.window_attention(x)
    else:
      x = jax.lax.cond(global_attention, lambda t: self.attn(t, self.global_rope_scale),
                       self.window_attention, x)
    x = shortcut + self.drop_path(x, drop_path_keep)
    return x + self.drop_path(self.mlp(self.norm2(x)), drop_path_keep)


class ViT(nnx.Module):
  """The trunk: patch embed + tiled abs pos + ln_pre + blocks; images (B, H, W, 3) -> (B, g, g, C).

  The blocks are stacked and scanned (models/stacking.py); each step gets its drop-path rate and
  whether it attends globally (`config.global_att_blocks`) as scanned inputs."""

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
    self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, config.vit_drop_path_rate,
                                                               config.vit_depth))
    self.global_blocks = tuple(i in config.global_att_blocks for i in range(config.vit_depth))
    self.blocks = stack_layers([Block(config, rngs=rngs) for _ in range(config.vit_depth)])

  def embed(self, images: jax.Array) -> jax.Array:
    """Tokens entering block 0: ln_pre(patch_embed(images) + tiled pos_embed), (B, g, g, C)."""
    x = self.patch_embed(images.astype(self.dtype))
    _, h, w, _ = x.shape
    x = x + tiled_abs_pos(self.pos_embed[...], h, w).astype(x.dtype)
    return self.ln_pre(x)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    # Keep probabilities as nnx.Dropout forms them: 1 - rate in float64, then float32.
    keep = np.float32([1.0 - rate for rate in self.drop_path_rates])
    per_block = (jnp.asarray(keep), jnp.asarray(self.global_blocks))
    x, _ = scan_layers(self.blocks, lambda block, x, xs: (block(x, *xs), None), x, per_block,
                       remat=self.remat)
    return x
