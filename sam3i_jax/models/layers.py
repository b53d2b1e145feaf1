"""Building blocks shared by every SAM 3 component.

Naming rule (the converter relies on it): attribute names mirror the PyTorch module names of
Meta's code, so a parameter's nnx path joined with '.' is its state-dict key, up to the leaf
renames in convert/torch_layout.py (kernel/scale/embedding -> weight, fused `in_proj`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5  # every LayerNorm/GroupNorm of SAM 3 (Flax's default is 1e-6)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch's default; nnx.gelu defaults to the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


# Rematerialisation policies of the scanned layers (Sam3Config.remat for the ViT / text blocks,
# layer_remat for the fusion-encoder / decoder layers; models/stacking.scan_layers): what the
# backward pass may keep from the forward; "none" keeps everything (no remat).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


ATTENTION_IMPLS = ("auto", "xla", "per_head", "blocked", "cudnn")

# The platform `auto` chooses for: set while tracing a step that is compiled for other devices
# than the default backend's (e.g. a TPU topology from a CPU host); None: jax.default_backend().
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attention_target_platform", default=None)


@contextlib.contextmanager
def compile_target(platform: str | None):
  """`with compile_target("tpu"): jax.jit(step).lower(...)`: attention_impl="auto" picks what it
  would on that platform ("cpu", "gpu", "tpu"; None: the default backend)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


class RowDropout(NamedTuple):
  """Attention dropout whose mask does not depend on how the queries are split into blocks:
  query row r of the (Lq, Lk) weights is masked with bernoulli(fold_in(key, r)) ("blocked" uses
  it; the same rate as nnx.Dropout, another draw of the masks)."""
  key: jax.Array
  rate: float

  def apply(self, weights: jax.Array, first_row: jax.Array | int = 0) -> jax.Array:
    """weights (B, H, rows, Lk), rows first_row, first_row + 1, ... of the full matrix."""
    b, h, rows, lk = weights.shape
    keep = 1.0 - self.rate
    draw = lambda r: jax.random.bernoulli(jax.random.fold_in(self.key, r), keep, (b, h, lk))  # noqa: E731
    mask = jnp.moveaxis(jax.vmap(draw)(first_row + jnp.arange(rows)), 0, 2)
    return jnp.where(mask, weights / jnp.asarray(keep, weights.dtype), jnp.zeros((), weights.dtype))


# Dropout of attention weights (B, H, rows, Lk) that start at query row `first_row`.
DropWeights = Callable[[jax.Array, jax.Array | int], jax.Array]


def _attend(q, k, v, bias, key_padding_mask, dropout: DropWeights | None = None,
            first_row: jax.Array | int = 0):
  """The attention arithmetic over (B, L, H, Dh); softmax in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if key_padding_mask is not None:
    logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    weights = dropout(weights, first_row)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


# Sequences whose (Lq x Lk) logits reach this size use query blocks ("blocked") off CPU: the
# fusion encoder's 5184-token self-attention, the ViT's global blocks.
LONG_ATTENTION = 1 << 20
# Logits per example and head in one query block of "blocked" (324 queries of 5184 keys: 7 MB).
BLOCKED_LOGITS = 1 << 21


def _choose_impl(impl: str, q: jax.Array, k: jax.Array, masked: bool, dropout_active: bool) -> str:
  if impl != "auto":
    return impl
  backend = _TARGET_PLATFORM.get() or jax.default_backend()
  logits = q.shape[1] * k.shape[1]
  if backend == "cpu" and not dropout_active and logits >= 1 << 16:
    return "per_head"
  if (backend == "gpu" and not masked and not dropout_active and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
    return "cudnn"
  return "blocked" if logits >= LONG_ATTENTION else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                          key_padding_mask: jax.Array | None = None,
                          dropout: nnx.Dropout | None = None, impl: str = "auto") -> jax.Array:
  """Scaled dot-product attention over (B, L, H, Dh) inputs; softmax in float32.

  bias: additive, broadcastable to (B, H, Lq, Lk). key_padding_mask: (B, Lk) bool, True = ignore
  (torch's convention). A query whose keys are all masked gets uniform weights over them instead of
  NaN (torch would return NaN; SAM 3 never produces such rows since the prompt has a CLS token).
  dropout: dropout on the attention weights, active unless deterministic.
  impl (all compute the same function; with active dropout the same in distribution: blocked
  draws its masks per query row, see RowDropout):
    xla: one batched einsum/softmax, logits (B, H, Lq, Lk) in float32.
    blocked: the same arithmetic over blocks of queries (lax.map), each block rematerialised in
      the backward pass: only one block's logits, weights and dropout mask (B, H, rows, Lk) exist
      at a time, forward or backward, instead of the whole (Lq, Lk) matrices (860 MB per example
      for the fusion encoder's 5184 tokens and 8 heads in float32, several of them kept for the
      backward pass).
    per_head: the same arithmetic one head and one block of queries at a time (lax.map); no
      dropout. On CPU a 72x72 global ViT block's attention ran 5x faster per head than batched,
      and query blocks gave another 2.6x: the logits no longer stream through memory.
    cudnn: jax.nn.dot_product_attention's fused kernel (GPU, 16-bit inputs, no mask/bias/dropout).
    auto: per_head on CPU for long sequences without dropout, cudnn on GPU where it applies,
      blocked for long sequences elsewhere, else xla; for the platform of `compile_target`.
  """
  dropout_active = dropout is not None and not dropout.deterministic and dropout.rate > 0
  impl = _choose_impl(impl, q, k, bias is not None or key_padding_mask is not None, dropout_active)
  if impl == "xla":
    return _attend(q, k, v, bias, key_padding_mask,
                   (lambda weights, _: dropout(weights)) if dropout_active else None)
  if impl == "blocked":
    drop = RowDropout(dropout.rngs(), float(dropout.rate)).apply if dropout_active else None
    return _attend_query_chunks(q, k, v, bias, key_padding_mask, drop, BLOCKED_LOGITS, remat=True)
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


def _attend_query_chunks(q, k, v, bias, key_padding_mask, dropout: DropWeights | None = None,
                         max_logits: int = 1 << 23, remat: bool = False):
  """_attend over blocks of queries (lax.map): each block's float32 logits stay cache-sized (on
  CPU this made a 5184-token attention 2.6x faster than one (Lq, Lk) block per head). remat:
  recompute each block in the backward pass instead of keeping its logits and weights."""
  b, lq = q.shape[:2]
  chunk = _query_chunk(lq, k.shape[1], max_logits)
  if chunk == lq:
    return _attend(q, k, v, bias, key_padding_mask, dropout)
  n = lq // chunk
  chunked_bias = bias is not None and bias.shape[-2] == lq
  xs = (jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0), jnp.arange(n) * chunk)
  if chunked_bias:
    xs += (jnp.moveaxis(bias.reshape(*bias.shape[:-2], n, chunk, bias.shape[-1]), -3, 0),)

  def block(xs):
    return _attend(xs[0], k, v, xs[2] if chunked_bias else bias, key_padding_mask, dropout, xs[1])

  if remat:
    block = jax.checkpoint(block, prevent_cse=False)
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
