"""SAM 3's text encoder: a CLIP-style causal transformer plus a resizer (sam3/model/text_encoder_ve.py).

Attribute names mirror `backbone.language_backbone.` of the PyTorch model (VETextEncoder):
`encoder` (TextTransformer: token_embedding, positional_embedding, transformer.resblocks, ln_final)
and `resizer`. The unused `text_projection` of the checkpoint is deliberately absent. With
`config.adapters` every block also holds SAM3-I's adapters (AdapterResidualBlock of
text_encoder_ve_ada.py), which the simple and complex levels run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.models.adapters import TextAdapter, adapter_path
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import MultiHeadAttention, dense, gelu, layer_norm
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.stacking import scan_layers, stack_layers


def causal_bias(length: int) -> np.ndarray:
  """(1, 1, L, L) additive mask: a token attends to itself and earlier tokens only."""
  mask = np.triu(np.ones((length, length), bool), k=1)
  return np.where(mask, np.finfo(np.float32).min, 0.0).astype(np.float32)[None, None]


class TextMLP(nnx.Module):
  """`mlp` of a ResidualAttentionBlock: c_fc, exact GELU, c_proj."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.c_fc = dense(width, hidden, rngs=rngs, dtype=dtype)
    self.c_proj = dense(hidden, width, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN block: `x += attn(ln_1(x), causal); x += mlp(ln_2(x))` (no layer scale).

  Simple / complex levels: the adapters run on the residual stream in parallel to the MLP, which
  still sees the pre-adapter stream: `m = mlp(ln_2(x)); x = A(x) + m`.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    width, dtype = config.text_width, config.compute_dtype
    self.attn = MultiHeadAttention(width, config.text_heads, rngs=rngs, dtype=dtype)
    self.ln_1 = layer_norm(width, rngs=rngs, dtype=dtype)
    self.ln_2 = layer_norm(width, rngs=rngs, dtype=dtype)
    self.mlp = TextMLP(width, width * config.text_mlp_ratio, rngs=rngs, dtype=dtype)
    if config.adapters:
      self.adapter1, self.adapter12, self.adapter2 = (TextAdapter(config, rngs=rngs) for _ in range(3))

  def __call__(self, x: jax.Array, bias: jax.Array, level: Level = Level.CONCEPT) -> jax.Array:
    t = self.ln_1(x)
    x = x + self.attn(t, t, t, bias=bias)
    mlp = self.mlp(self.ln_2(x))
    if level is not Level.CONCEPT:
      x = adapter_path(level, x, self)
    return x + mlp


class Transformer(nnx.Module):
  """The causal blocks, stacked and scanned (models/stacking.py)."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.resblocks = stack_layers([ResidualAttentionBlock(config, rngs=rngs)
                                   for _ in range(config.text_layers)])
    self.remat = config.remat

  def __call__(self, x: jax.Array, bias: jax.Array, level: Level = Level.CONCEPT) -> jax.Array:
    x, _ = scan_layers(self.resblocks, lambda block, x, _: (block(x, bias, level), None), x,
                       remat=self.remat)
    return x


class TextTransformer(nnx.Module):
  """Token + positional embedding, causal blocks, ln_final; returns all token states (no pooling)."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    width, dtype = config.text_width, config.compute_dtype
    self.dtype = dtype
    self.token_embedding = nnx.Embed(config.vocab_size, width, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)
    # CLIP's init, N(0, 0.01^2) (the reference leaves it uninitialised).
    self.positional_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (config.context_length, width), jnp.float32))
    self.transformer = Transformer(config, rngs=rngs)
    self.ln_final = layer_norm(width, rngs=rngs, dtype=dtype)

  def __call__(self, token_ids: jax.Array, level: Level = Level.CONCEPT
               ) -> tuple[jax.Array, jax.Array]:
    """token_ids (B, L) -> (token states (B, L, width), token embeddings (B, L, width))."""
    length = token_ids.shape[1]
    embeds = self.token_embedding(token_ids)
    x = embeds + self.positional_embedding[...][:length].astype(self.dtype)
    x = self.transformer(x, jnp.asarray(causal_bias(length)), level)
    return self.ln_final(x), embeds


class TextEncoder(nnx.Module):
  """VETextEncoder: text tokens -> prompt tokens of width d_model.

  Padding is not masked inside the encoder (the causal mask alone keeps real tokens from seeing
  the padding after them); the padding mask is returned for the layers downstream.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.encoder = TextTransformer(config, rngs=rngs)
    self.resizer = dense(config.text_width, config.d_model, rngs=rngs, dtype=config.compute_dtype)

  def __call__(self, token_ids: jax.Array, level: Level | str = Level.CONCEPT
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """token_ids (B, L) int, L <= context_length, 0 = padding; level (static) picks the adapters.

    Returns features (B, L, d_model) (`language_features`), pad_mask (B, L) bool True where the
    id is 0 (`language_mask`), and the raw token embeddings (B, L, text_width), without the
    positional term (`language_embeds`, the reference's `inputs_embeds`).
    """
    states, embeds = self.encoder(token_ids, parse_level(level))
    return self.resizer(states), token_ids == 0, embeds
