"""The DETR-style decoder of SAM 3 (sam3/model/decoder.py), batch-first.

Attribute names mirror `transformer.decoder.*` of the PyTorch checkpoint. Six post-norm layers refine
`num_queries` learned boxes (cxcywh, sigmoid space) while a presence token, prepended to the queries,
predicts whether the prompt is in the image at all. Image cross-attention carries a per-head additive
box relative-position bias ("log" mode) over the token grid.

In training mode (`model.train()`, which sets `deterministic=False`) the decoder applies DAC: the
queries and reference boxes are duplicated; the first half (one-to-one) runs as usual, the second half
(one-to-many) skips self-attention. Outputs then have 2Q queries.

With `config.adapters` every layer holds SAM3-I's adapters (TransformerDecoderLayer_Ada), applied
next to the FFN for the simple and complex levels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.box_ops import box_cxcywh_to_xyxy
from sam3i_jax.models.adapters import BottleneckAdapter, adapter_path
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import MLP, MultiHeadAttention, dense, dropout_layer, layer_norm
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.position_encoding import query_sine_embed
from sam3i_jax.models.stacking import scan_layers, stack_layers

INVERSE_SIGMOID_EPS = 1e-3
RPB_LOG_SCALE = 8.0  # deltas (in units of the image side) are stretched to [-8, 8] before the log


def inverse_sigmoid(x: jax.Array, eps: float = INVERSE_SIGMOID_EPS) -> jax.Array:
  """log(x / (1 - x)) with x clamped to [0, 1] and both terms floored at eps (model_misc)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def rpb_log_deltas(coords: np.ndarray, edges: jax.Array) -> jax.Array:
  """coords (N,) in [0, 1); edges (B, Q, 2) box edges along that axis -> (B, Q, N, 2).

  d = coord - edge, then sign(8d) * log2(|8d| + 1) / log2(8).
  """
  d = (jnp.asarray(coords)[None, None, :, None] - edges[:, :, None, :]) * RPB_LOG_SCALE
  return jnp.sign(d) * jnp.log2(jnp.abs(d) + 1.0) / np.float32(np.log2(RPB_LOG_SCALE))


def grid_coords(size: int) -> np.ndarray:
  """arange(size) / size in float32: the left/top edge of each token cell, normalised."""
  return (np.arange(size, dtype=np.float32) / np.float32(size)).astype(np.float32)


class TransformerDecoderLayer(nnx.Module):
  """Post-norm layer: self-attention, text cross-attention, image cross-attention, FFN.

  `tgt = norm2(tgt + SA(q=k=tgt+qpos, v=tgt))` (one-to-one half only under DAC; norm2 on both halves),
  `tgt = catext_norm(tgt + CA_text(q=tgt+qpos, k=v=prompt))`,
  `tgt = norm1(tgt + CA_img(q=tgt+qpos, k=memory+pos, v=memory, bias))`,
  `tgt = norm3(tgt + FFN(tgt))` with the FFN in float32 (the reference disables autocast there).
  The presence token rides along at position 0 with a zero query_pos and a zero bias row.
  With adapters the last step is `tgt = norm3(tgt + a(tgt) + FFN(tgt))`, a = adapter1 (simple) or
  adapter2(adapter12(tgt)) (complex; unlike the fusion encoder's, this adapter2 has no skip).
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, heads, rate, dtype = config.d_model, config.num_heads, config.dropout, config.compute_dtype
    self.cross_attn = MultiHeadAttention(d, heads, rngs=rngs, dtype=dtype, dropout=rate)
    self.dropout1 = dropout_layer(rate, rngs=rngs)
    self.norm1 = layer_norm(d, rngs=rngs, dtype=dtype)
    self.ca_text = MultiHeadAttention(d, heads, rngs=rngs, dtype=dtype, dropout=rate)
    self.catext_dropout = dropout_layer(rate, rngs=rngs)
    self.catext_norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.self_attn = MultiHeadAttention(d, heads, rngs=rngs, dtype=dtype, dropout=rate)
    self.dropout2 = dropout_layer(rate, rngs=rngs)
    self.norm2 = layer_norm(d, rngs=rngs, dtype=dtype)
    # The FFN always computes in float32.
    self.linear1 = dense(d, config.dim_feedforward, rngs=rngs, dtype=jnp.float32)
    self.dropout3 = dropout_layer(rate, rngs=rngs)
    self.linear2 = dense(config.dim_feedforward, d, rngs=rngs, dtype=jnp.float32)
    self.dropout4 = dropout_layer(rate, rngs=rngs)
    self.norm3 = layer_norm(d, rngs=rngs, dtype=dtype)
    if config.adapters:
      self.adapter1, self.adapter12, self.adapter2 = (
          BottleneckAdapter(d, config.adapter_bottleneck, rngs=rngs, dtype=dtype) for _ in range(3))

  def ffn(self, x: jax.Array) -> jax.Array:
    """linear2(relu(linear1(x))) in float32 (without the residual)."""
    return self.linear2(self.dropout3(jax.nn.relu(self.linear1(x.astype(jnp.float32)))))

  def __call__(self, tgt: jax.Array, query_pos: jax.Array, presence: jax.Array, prompt: jax.Array,
               prompt_mask: jax.Array, memory: jax.Array, memory_pos: jax.Array, bias: jax.Array,
               *, dac: bool = False, level: Level = Level.CONCEPT) -> tuple[jax.Array, jax.Array]:
    """tgt, query_pos (B, N, D); presence (B, 1, D); prompt (B, P, D) with prompt_mask (B, P)
    True = pad; memory, memory_pos (B, L, D); bias (B, H, N, L) additive image-attention bias.
    dac: N = 2Q and only the first Q queries (plus presence) self-attend.
    Returns (tgt (B, N, D), presence (B, 1, D))."""
    n_o2o = tgt.shape[1] // 2 if dac else tgt.shape[1]
    zero_pos = jnp.zeros_like(presence, dtype=query_pos.dtype)
    o2o = jnp.concatenate([presence.astype(tgt.dtype), tgt[:, :n_o2o]], axis=1)
    qk = o2o + jnp.concatenate([zero_pos, query_pos[:, :n_o2o]], axis=1)
    o2o = o2o + self.dropout2(self.self_attn(qk, qk, o2o))
    x = jnp.concatenate([o2o, tgt[:, n_o2o:]], axis=1) if dac else o2o
    x = self.norm2(x)  # dac_use_selfatt_ln: after recombining, on both halves

    query_pos = jnp.concatenate([zero_pos, query_pos], axis=1)
    x = self.catext_norm(x + self.catext_dropout(
        self.ca_text(x + query_pos, prompt, prompt, key_padding_mask=prompt_mask)))

    bias = jnp.concatenate([jnp.zeros_like(bias[:, :, :1]), bias], axis=2)
    x = self.norm1(x + self.dropout1(
        self.cross_attn(x + query_pos, memory + memory_pos, memory, bias=bias)))

    ffn = self.dropout4(self.ffn(x))
    if level is not Level.CONCEPT:
      x = x + adapter_path(level, x, self)
    x = self.norm3(x + ffn)
    return x[:, 1:], x[:, :1]


class TransformerDecoder(nnx.Module):
  """`transformer.decoder`: queries, reference boxes, box refinement, box RPB and presence token.
  The layers are stacked and scanned (models/stacking.py), rematerialised by `config.layer_remat`."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, config.compute_dtype
    self.config = config
    self.layers = stack_layers([TransformerDecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_dec_layers)])
    self.remat = config.layer_remat
    self.norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.bbox_embed = MLP(d, d, 4, 3, rngs=rngs, dtype=dtype)
    last = self.bbox_embed.layers[-1]  # zero-initialised as in the reference: refinement starts at 0
    last.kernel.set_value(jnp.zeros_like(last.kernel[...]))
    last.bias.set_value(jnp.zeros_like(last.bias[...]))
    unit_normal = nnx.initializers.normal(1.0)  # torch's nn.Embedding / normal_ init
    self.query_embed = nnx.Embed(config.num_queries, d, param_dtype=jnp.float32,
                                 embedding_init=unit_normal, rngs=rngs)
    self.reference_points = nnx.Embed(config.num_queries, 4, param_dtype=jnp.float32,
                                      embedding_init=unit_normal, rngs=rngs)
    self.boxRPB_embed_x = MLP(2, d, config.num_heads, 2, rngs=rngs, dtype=dtype)
    self.boxRPB_embed_y = MLP(2, d, config.num_heads, 2, rngs=rngs, dtype=dtype)
    self.presence_token = nnx.Embed(1, d, param_dtype=jnp.float32, rngs=rngs)
    self.presence_token_head = MLP(d, d, 1, 3, rngs=rngs, dtype=dtype)
    self.presence_token_out_norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.ref_point_head = MLP(2 * d, d, d, 2, rngs=rngs, dtype=dtype)
    self.deterministic = True  # nnx's train()/eval()/view() flip it; False = training = DAC on

  def set_view(self, deterministic: bool | None = None):
    """Lets `nnx.view(model, deterministic=...)` switch DAC along with dropout."""
    if deterministic is not None:
      self.deterministic = deterministic

  def rpb_matrix(self, ref_boxes: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Box relative-position bias: ref_boxes (B, Q, 4) cxcywh -> (B, heads, Q, h * w).

    bias[b, :, q, i * w + j] = embed_y(dy[q, i]) + embed_x(dx[q, j]), where dy/dx hold the log-scaled
    offsets of row i / column j from the box's two edges along that axis.
    """
    h, w = grid
    xyxy = box_cxcywh_to_xyxy(ref_boxes.astype(jnp.float32))
    by = self.boxRPB_embed_y(rpb_log_deltas(grid_coords(h), xyxy[..., 1::2]))  # (B, Q, h, heads)
    bx = self.boxRPB_embed_x(rpb_log_deltas(grid_coords(w), xyxy[..., 0::2]))  # (B, Q, w, heads)
    bias = by[:, :, :, None, :] + bx[:, :, None, :, :]  # (B, Q, h, w, heads)
    b, q = ref_boxes.shape[:2]
    return bias.reshape(b, q, h * w, -1).transpose(0, 3, 1, 2)

  def refine(self, ref_boxes: jax.Array, hs: jax.Array) -> jax.Array:
    """sigmoid(inverse_sigmoid(ref) + bbox_embed(hs)): the boxes predicted from normed outputs hs
    (..., Q, D) and the matching input refs (..., Q, 4) -> (..., Q, 4)."""
    delta = self.bbox_embed(hs).astype(jnp.float32)
    return jax.nn.sigmoid(inverse_sigmoid(ref_boxes.astype(jnp.float32)) + delta)

  def __call__(self, memory: jax.Array, memory_pos: jax.Array, prompt: jax.Array,
               prompt_mask: jax.Array, grid: tuple[int, int], level: Level | str = Level.CONCEPT
               ) -> dict[str, jax.Array]:
    """memory (B, L, D) fused image tokens; memory_pos (L, D) or (B, L, D); prompt (B, P, D);
    prompt_mask (B, P) True = pad; grid (h, w) static with h * w = L; level (static) picks the
    adapters.

    Returns hs (layers, B, N, D) = norm(layer outputs); ref_boxes (layers, B, N, 4) the input
    reference boxes of each layer (sigmoid space, cxcywh); presence_logits (layers, B, 1), not
    clamped; presence_feats (B, 1, D), the last layer's raw presence token. N = Q in eval mode, 2Q in
    training (DAC: first Q one-to-one, last Q one-to-many).
    """
    b, length, d = memory.shape
    if grid[0] * grid[1] != length:
      raise ValueError(f"grid {grid} does not match {length} memory tokens")
    dtype = self.config.compute_dtype
    level = parse_level(level)
    dac = not self.deterministic
    copies = 2 if dac else 1
    memory = memory.astype(dtype)
    memory_pos = jnp.broadcast_to(memory_pos, memory.shape).astype(dtype)
    prompt = prompt.astype(dtype)

    tgt = jnp.tile(self.query_embed.embedding[...], (copies, 1)).astype(dtype)
    tgt = jnp.broadcast_to(tgt[None], (b, *tgt.shape))
    ref = jax.nn.sigmoid(jnp.tile(self.reference_points.embedding[...], (copies, 1)))
    ref = jnp.broadcast_to(ref[None], (b, *ref.shape))
    presence = jnp.broadcast_to(self.presence_token.embedding[...][None], (b, 1, d)).astype(dtype)

    def body(layer, carry, _):
      tgt, presence, ref = carry
      query_pos = self.ref_point_head(query_sine_embed(ref, d).astype(dtype))
      bias = self.rpb_matrix(ref, grid)
      tgt, presence = layer(tgt, query_pos, presence, prompt, prompt_mask, memory, memory_pos, bias,
                            dac=dac, level=level)
      normed = self.norm(tgt)
      new_ref = self.refine(ref, normed)
      # The reference "clamps" these with a non-in-place clamp whose result it drops: not clamped.
      presence_logit = self.presence_token_head(self.presence_token_out_norm(presence))[:, :, 0]
      # The next layer's input boxes are detached; the reported ones keep their gradient.
      return (tgt, presence, jax.lax.stop_gradient(new_ref)), (normed, new_ref, presence_logit)

    (_, presence, _), (hs, new_refs, presence_logits) = scan_layers(
        self.layers, body, (tgt, presence, ref), remat=self.remat)
    return {
        "hs": hs,
        "ref_boxes": jnp.concatenate([ref[None], new_refs[:-1]]),
        "presence_logits": presence_logits,
        "presence_feats": presence,
    }
