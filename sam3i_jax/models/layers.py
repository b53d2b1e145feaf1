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


# Rematerialisation policies of the ViT / text-encoder blocks (Sam3Config.remat): what the backward
# pass may keep from the forward; "none" keeps everything (no remat).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_block(block: nnx.Module, remat: str, *args, **static):
  """block(*args, **static), rematerialised in the backward pass under the named policy;
  `static` holds the non-array arguments."""
  if remat == "none":
    return block(*args, **static)
  return nnx.remat(lambda b, *a: b(*a, **static), policy=REMAT_POLICIES[remat])(block, *args)


def dropout_layer(rate: float, *, rngs: nnx.Rngs, broadcast_dims: tuple[int, ...] = ()) -> nnx.Dropout:
  """An nnx.Dropout that starts inactive: models are in eval mode until `.train()` (nnx's own
  default is active), so a freshly built or converted model runs deterministically."""
  return nnx.Dropout(rate, broadcast_dims=broadcast_dims, deterministic=True, rngs=rngs)


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
    self.drop = dropout_layer(dropout, rngs=rngs) if dropout > 0 else None
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


ATTENTION_IMPLS = ("auto", "xla", "per_head", "cudnn")


def _attend(q, k, v, bias, key_padding_mask, dropout):
  """The attention arithmetic over (B, L, H, Dh); softmax in float32."""
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


def _choose_impl(impl: str, q: jax.Array, k: jax.Array, masked: bool, dropout_active: bool) -> str:
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "cpu" and not dropout_active and q.shape[1] * k.shape[1] >= 1 << 16:
    return "per_head"
  if (backend == "gpu" and not masked and not dropout_active and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
    return "cudnn"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                          key_padding_mask: jax.Array | None = None,
                          dropout: nnx.Dropout | None = None, impl: str = "auto") -> jax.Array:
  """Scaled dot-product attention over (B, L, H, Dh) inputs; softmax in float32.

  bias: additive, broadcastable to (B, H, Lq, Lk). key_padding_mask: (B, Lk) bool, True = ignore
  (torch's convention). A query whose keys are all masked gets uniform weights over them instead of
  NaN (torch would return NaN; SAM 3 never produces such rows since the prompt has a CLS token).
  impl (all compute the same function):
    xla: one batched einsum/softmax, logits (B, H, Lq, Lk) in float32.
    per_head: the same arithmetic one head and one block of queries at a time (lax.map). On CPU a
      72x72 global ViT block's attention ran 5x faster per head than batched, and query blocks gave
      another 2.6x: the logits no longer stream through memory (1.7 GB of them in one global block).
    cudnn: jax.nn.dot_product_attention's fused kernel (GPU, 16-bit inputs, no mask/bias/dropout).
    auto: per_head on CPU for long sequences, cudnn on GPU where it applies, else xla.
  """
  dropout_active = dropout is not None and not dropout.deterministic
  impl = _choose_impl(impl, q, k, bias is not None or key_padding_mask is not None, dropout_active)
  if impl == "xla":
    return _attend(q, k, v, bias, key_padding_mask, dropout)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if impl != "per_head":
    raise ValueError(f"unknown attention impl {impl!r}; choose from {ATTENTION_IMPLS}")
  if dropout_active:
    raise ValueError("per_head attention does not support active attention dropout")
  per_head_bias = bias is not None and bias.ndim == 4 and bias.shape[1] > 1
  split = lambda a: jnp.moveaxis(a, 2, 0)[:, :, :, None]  # (H, B, L, 1, Dh)

  def one_head(xs):
    qh, kh, vh = xs[:3]
    head_bias = xs[3] if per_head_bias else bias
    return _attend_query_chunks(qh, kh, vh, head_bias, key_padding_mask)[:, :, 0]

  xs = (split(q), split(k), split(v))
  if per_head_bias:
    xs += (jnp.moveaxis(bias, 1, 0)[:, :, None],)  # (H, B, 1, Lq, Lk)
  return jnp.moveaxis(jax.lax.map(one_head, xs), 0, 2)


def _query_chunk(num_queries: int, num_keys: int, max_logits: int = 1 << 23) -> int:
  """The largest divisor of num_queries whose logits block (chunk x num_keys) fits max_logits."""
  limit = max(1, max_logits // num_keys)
  return max(c for c in range(1, min(num_queries, limit) + 1) if num_queries % c == 0)


def _attend_query_chunks(q, k, v, bias, key_padding_mask):
  """_attend over blocks of queries (lax.map): each block's float32 logits stay cache-sized. On CPU
  this made a 5184-token attention 2.6x faster than one (Lq, Lk) block per head."""
  b, lq = q.shape[:2]
  chunk = _query_chunk(lq, k.shape[1])
  if chunk == lq:
    return _attend(q, k, v, bias, key_padding_mask, None)
  n = lq // chunk
  chunked_bias = bias is not None and bias.shape[-2] == lq
  xs = (jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0),)
  if chunked_bias:
    xs += (jnp.moveaxis(bias.reshape(*bias.shape[:-2], n, chunk, bias.shape[-1]), -3, 0),)

  def block(xs):
    return _attend(xs[0], k, v, xs[1] if chunked_bias else bias, key_padding_mask, None)

  return jnp.moveaxis(jax.lax.map(block, xs), 0, 1).reshape(q.shape[:2] + v.shape[2:])


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
    self.attn_drop = dropout_layer(dropout, rngs=rngs) if dropout > 0 else None
    self.dtype = dtype
    self.attention_impl = "auto"  # see dot_product_attention; set_attributes(attention_impl=...) changes it

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
                                dropout=self.attn_drop, impl=self.attention_impl)
    return self.out_proj(out.reshape(*out.shape[:-2], self.embed_dim))
