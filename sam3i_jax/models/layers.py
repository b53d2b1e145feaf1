"""Building blocks shared by every SAM 3 component.

Naming rule (the converter relies on it): attribute names mirror the PyTorch module names of
Meta's code, so a parameter's nnx path joined with '.' is its state-dict key, up to the leaf
renames in convert/torch_layout.py (kernel/scale/embedding -> weight, fused `in_proj`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5  # every LayerNorm/GroupNorm of SAM 3 (Flax's default is 1e-6)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch's default; nnx.gelu defaults to the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
          use_bias: bool = True) -> nnx.Linear:
  """A Linear with float32 parameters computing in `dtype`."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def conv(in_features: int, out_features: int, kernel: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
         padding: int = 0, stride: int = 1, use_bias: bool = True) -> nnx.Conv:
  """NHWC convolution with torch's symmetric integer padding."""
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=(stride, stride),
                  padding=((padding, padding), (padding, padding)), use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)


class MLP(nnx.Module):
  """Linear layers with ReLU in between (none after the last); `MLP` of sam3/model/model_misc.py."""

  def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32, dropout: float = 0.0, residual: bool = False,
               out_norm: bool = False):
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nnx.List([dense(a, b, rngs=rngs, dtype=dtype) for a, b in zip(dims[:-1], dims[1:])])
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    if residual and input_dim != output_dim:
      raise ValueError("residual MLP needs input_dim == output_dim")
    self.residual = residual
    self.out_norm = layer_norm(output_dim, rngs=rngs, dtype=dtype) if out_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    inputs = x
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
        if self.drop is not None:
          x = self.drop(x)
    if self.residual:
      x = x + inputs
    if self.out_norm is not None:
      x = self.out_norm(x)
    return x


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                          key_padding_mask: jax.Array | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Scaled dot-product attention over (B, L, H, Dh) inputs; softmax in float32.

  bias: additive, broadcastable to (B, H, Lq, Lk). key_padding_mask: (B, Lk) bool, True = ignore
  (torch's convention). A query whose keys are all masked gets uniform weights over them instead of
  NaN (torch would return NaN; SAM 3 never produces such rows since the prompt has a CLS token).
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if key_padding_mask is not None:
    logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


class MultiHeadAttention(nnx.Module):
  """torch.nn.MultiheadAttention (batch-first here): fused `in_proj` (q|k|v rows) and `out_proj`.

  Values never carry a positional term in SAM 3, so callers add positions to q/k themselves.
  """

  def __init__(self, embed_dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               dropout: float = 0.0):
    if embed_dim % num_heads:
      raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.in_proj = dense(embed_dim, 3 * embed_dim, rngs=rngs, dtype=dtype)
    self.out_proj = dense(embed_dim, embed_dim, rngs=rngs, dtype=dtype)
    self.attn_drop = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.dtype = dtype

  def _project(self, x: jax.Array, index: int) -> jax.Array:
    d = self.embed_dim
    kernel = self.in_proj.kernel[...][:, index * d:(index + 1) * d]
    bias = self.in_proj.bias[...][index * d:(index + 1) * d]
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return y.reshape(*y.shape[:-1], self.num_heads, d // self.num_heads)

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               key_padding_mask: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """query (B, Lq, D), key/value (B, Lk, D) -> (B, Lq, D)."""
    q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
    out = dot_product_attention(q, k, v, bias=bias, key_padding_mask=key_padding_mask,
                                dropout=self.attn_drop)
    return self.out_proj(out.reshape(*out.shape[:-2], self.embed_dim))
