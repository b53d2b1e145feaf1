"""Pre-norm transformer encoder layer and the fusion encoder (sam3/model/encoder.py).

The same layer class serves the fusion encoder (image tokens attend to the prompt) and the
geometry encoder (prompt tokens attend to the image); the two differ only in where the
positional term goes. Only the fusion encoder's layers carry SAM3-I's adapters
(TransformerEncoderLayer_Ada).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.adapters import BottleneckAdapter, adapter_path
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import MultiHeadAttention, dense, dropout_layer, layer_norm
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.stacking import scan_layers, stack_layers


class TransformerEncoderLayer(nnx.Module):
  """`t = norm1(x); x += SA(q=k=t[+query_pos], v=t); x += CA(q=norm2(x), k=mem[+pos], v=mem);
  x += FFN(norm3(x))` with ReLU FFN and dropout after each sub-block (training only).

  With adapters, the last step is `x = x + a(x) + FFN(norm3(x))`, where a = adapter1 (simple) or
  adapter12 + adapter2(adapter12) (complex: this adapter2 has its own skip).
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs, pos_enc_at_attn: bool,
               pos_enc_at_cross_attn_keys: bool, adapters: bool = False):
    d, dtype, rate = config.d_model, config.compute_dtype, config.dropout
    self.self_attn = MultiHeadAttention(d, config.num_heads, rngs=rngs, dtype=dtype, dropout=rate)
    self.cross_attn_image = MultiHeadAttention(d, config.num_heads, rngs=rngs, dtype=dtype, dropout=rate)
    self.linear1 = dense(d, config.dim_feedforward, rngs=rngs, dtype=dtype)
    self.linear2 = dense(config.dim_feedforward, d, rngs=rngs, dtype=dtype)
    self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.norm3 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.dropout = dropout_layer(rate, rngs=rngs)  # inside the FFN
    self.dropout1 = dropout_layer(rate, rngs=rngs)
    self.dropout2 = dropout_layer(rate, rngs=rngs)
    self.dropout3 = dropout_layer(rate, rngs=rngs)
    self.pos_enc_at_attn = pos_enc_at_attn
    self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
    if adapters:
      self.adapter1, self.adapter12, self.adapter2 = (
          BottleneckAdapter(d, config.adapter_bottleneck, rngs=rngs, dtype=dtype) for _ in range(3))

  def ffn(self, x: jax.Array) -> jax.Array:
    return self.linear2(self.dropout(jax.nn.relu(self.linear1(x))))

  def __call__(self, tgt: jax.Array, memory: jax.Array, *, query_pos: jax.Array | None = None,
               pos: jax.Array | None = None, tgt_key_padding_mask: jax.Array | None = None,
               memory_key_padding_mask: jax.Array | None = None,
               level: Level = Level.CONCEPT) -> jax.Array:
    """tgt (B, Lq, D) attends to itself and to memory (B, Lm, D); masks are True = padding."""
    t = self.norm1(tgt)
    qk = t + query_pos if self.pos_enc_at_attn else t
    tgt = tgt + self.dropout1(self.self_attn(qk, qk, t, key_padding_mask=tgt_key_padding_mask))
    keys = memory + pos if self.pos_enc_at_cross_attn_keys else memory
    t = self.norm2(tgt)
    tgt = tgt + self.dropout2(self.cross_attn_image(t, keys, memory,
                                                    key_padding_mask=memory_key_padding_mask))
    ffn = self.dropout3(self.ffn(self.norm3(tgt)))
    if level is not Level.CONCEPT:
      tgt = tgt + adapter_path(level, tgt, self, second_skip=True)
    return tgt + ffn


class TransformerEncoderFusion(nnx.Module):
  """Image tokens attend to themselves (with positions) and to the prompt; no final norm.

  The prompt (text + geometry tokens) is not updated. The layers are stacked and scanned
  (models/stacking.py), rematerialised per layer by `config.layer_remat`.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.layers = stack_layers([
        TransformerEncoderLayer(config, rngs=rngs, pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False,
                                adapters=config.adapters)
        for _ in range(config.num_enc_layers)])
    self.remat = config.layer_remat

  def __call__(self, image_tokens: jax.Array, image_pos: jax.Array, prompt: jax.Array,
               prompt_mask: jax.Array, level: Level | str = Level.CONCEPT) -> jax.Array:
    """image_tokens, image_pos (B, L, D); prompt (B, P, D); prompt_mask (B, P) True = pad;
    level (static) picks the adapters."""
    level = parse_level(level)
    x = image_tokens
    image_pos = jnp.broadcast_to(image_pos, x.shape).astype(x.dtype)

    def body(layer, x, _):
      return layer(x, prompt, query_pos=image_pos, memory_key_padding_mask=prompt_mask,
                   level=level), None

    x, _ = scan_layers(self.layers, body, x, remat=self.remat)
    return x
