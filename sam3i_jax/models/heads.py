"""Scoring and segmentation heads of SAM 3 (sam3/model/model_misc.py DotProductScoring,
sam3/model/maskformer_segmentation.py UniversalSegmentationHead / PixelDecoder / MaskPredictor).

Attribute names mirror `dot_prod_scoring.*` and `segmentation_head.*`. Images are NHWC here; the
outputs keep the reference's layouts: pred_masks (B, Q, H, W), semantic_seg (B, 1, H, W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import LN_EPS, MLP, MultiHeadAttention, conv, dense, layer_norm
from sam3i_jax.models.levels import Level, parse_level

GROUP_NORM_GROUPS = 8
MASK_PREDICTORS = {Level.CONCEPT: "mask_predictor", Level.SIMPLE: "mask_predictor_adapter1",
                   Level.COMPLEX: "mask_predictor_adapter2"}


def masked_mean(x: jax.Array, pad_mask: jax.Array) -> jax.Array:
  """Mean over the valid (pad_mask False) tokens: x (B, P, D), pad_mask (B, P) -> (B, D)."""
  valid = (~pad_mask).astype(x.dtype)[..., None]
  return (x * valid).sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)


class DotProductScoring(nnx.Module):
  """logits = hs_proj(hs) . prompt_proj(mean(LN(prompt + MLP(prompt)))) / sqrt(d), clamped."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, config.compute_dtype
    self.prompt_mlp = MLP(d, config.dim_feedforward, d, 2, rngs=rngs, dtype=dtype,
                          dropout=config.dropout, residual=True, out_norm=True)
    self.prompt_proj = dense(d, d, rngs=rngs, dtype=dtype)
    self.hs_proj = dense(d, d, rngs=rngs, dtype=dtype)
    self.scale = float(1.0 / np.sqrt(d))
    self.clamp = float(config.logit_clamp)

  def pooled_prompt(self, prompt: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """prompt (B, P, D), prompt_mask (B, P) True = pad -> (B, D) projected pooled prompt."""
    return self.prompt_proj(masked_mean(self.prompt_mlp(prompt), prompt_mask))

  def __call__(self, hs: jax.Array, prompt: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """hs (layers, B, Q, D) -> logits (layers, B, Q, 1) in [-logit_clamp, logit_clamp]."""
    pooled = self.pooled_prompt(prompt, prompt_mask)
    scores = jnp.einsum("lbqd,bd->lbq", self.hs_proj(hs), pooled)[..., None] * self.scale
    return jnp.clip(scores, -self.clamp, self.clamp)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """F.interpolate(mode="nearest", size=size) on NHWC: source index floor(dst * in / out)."""
  def index(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  return jnp.take(jnp.take(x, index(h, size[0]), axis=1), index(w, size[1]), axis=2)


def group_norm(dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
  """torch.nn.GroupNorm(8, dim): eps 1e-5, two-pass variance."""
  return nnx.GroupNorm(dim, num_groups=GROUP_NORM_GROUPS, epsilon=LN_EPS, dtype=dtype,
                       param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class PixelDecoder(nnx.Module):
  """FPN-style top-down path: prev = relu(GN(conv3x3(feat + nearest_up(prev)))), coarse to fine.

  The reference builds one conv/norm per upsampling stage (3) but, fed 3 FPN scales, uses only the
  first two; `conv_layers.2` / `norms.2` exist for the checkpoint.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs, num_stages: int = 3):
    d, dtype = config.d_model, config.compute_dtype
    self.conv_layers = nnx.List([conv(d, d, 3, padding=1, rngs=rngs, dtype=dtype)
                                 for _ in range(num_stages)])
    self.norms = nnx.List([group_norm(d, rngs=rngs, dtype=dtype) for _ in range(num_stages)])

  def __call__(self, feats: list[jax.Array]) -> jax.Array:
    """feats: NHWC maps, finest first (the last one is the start) -> the finest map."""
    prev = feats[-1]
    for i, feat in enumerate(feats[-2::-1]):
      prev = feat + nearest_resize(prev, feat.shape[1:3])
      prev = jax.nn.relu(self.norms[i](self.conv_layers[i](prev)))
    return prev


class MaskPredictor(nnx.Module):
  """pred_masks[b, q] = mask_embed(query[b, q]) . instance_embeds[b] (per pixel)."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d = config.d_model
    self.mask_embed = MLP(d, d, d, 3, rngs=rngs, dtype=config.compute_dtype)

  def __call__(self, queries: jax.Array, instance_embeds: jax.Array) -> jax.Array:
    """queries (B, Q, D), instance_embeds (B, H, W, D) -> mask logits (B, Q, H, W)."""
    emb = self.mask_embed(queries)
    return jnp.einsum("bqc,bhwc->bqhw", emb, instance_embeds.astype(emb.dtype))


class SegmentationHead(nnx.Module):
  """`segmentation_head`: prompt-aware encoder tokens + pixel decoder -> instance and semantic masks.

  e = memory + cross_attend_prompt(q=cross_attn_norm(memory), k=v=prompt) replaces the coarsest FPN
  scale; the pixel decoder upsamples to the finest scale; 1x1 convs give the per-pixel instance
  embeddings (dotted with mask_embed(queries)) and the semantic logits.

  With adapters, SAM3-I's copies mask_predictor_adapter1 / _adapter2 (built as copies of
  mask_predictor) replace mask_predictor for the simple / complex level; nothing else changes
  (the reference's pixel-decoder adapters are never wired in).
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, config.compute_dtype
    self.pixel_decoder = PixelDecoder(config, rngs=rngs)
    self.mask_predictor = MaskPredictor(config, rngs=rngs)
    self.cross_attend_prompt = MultiHeadAttention(d, config.num_heads, rngs=rngs, dtype=dtype,
                                                  dropout=0.0)
    self.cross_attn_norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.semantic_seg_head = conv(d, 1, 1, rngs=rngs, dtype=dtype)
    self.instance_seg_head = conv(d, d, 1, rngs=rngs, dtype=dtype)
    self.dtype = dtype
    if config.adapters:
      self.mask_predictor_adapter1 = nnx.clone(self.mask_predictor)
      self.mask_predictor_adapter2 = nnx.clone(self.mask_predictor)

  def pixel_embeddings(self, fpn: list[jax.Array], memory: jax.Array, prompt: jax.Array,
                       prompt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fpn [(B,4g,4g,D), (B,2g,2g,D), (B,g,g,D)]; memory (B, g*g, D) fusion-encoder output;
    prompt (B, P, D), prompt_mask (B, P) True = pad.
    Returns (instance_embeds (B, 4g, 4g, D), semantic_seg (B, 1, 4g, 4g))."""
    b, h, w, d = fpn[-1].shape
    memory = memory.astype(self.dtype)
    attended = self.cross_attend_prompt(self.cross_attn_norm(memory), prompt, prompt,
                                        key_padding_mask=prompt_mask)
    enc = (memory + attended).reshape(b, h, w, d)
    pixel = self.pixel_decoder([*fpn[:-1], enc])
    semantic = self.semantic_seg_head(pixel).transpose(0, 3, 1, 2)
    return self.instance_seg_head(pixel), semantic

  def predict_masks(self, queries: jax.Array, instance_embeds: jax.Array,
                    predictor: MaskPredictor | None = None) -> jax.Array:
    """The mask-embedding step: queries (B, Q, D) x instance_embeds (B, H, W, D) -> (B, Q, H, W).

    `predictor` swaps in another MaskPredictor (SAM3-I's per-level copies); default mask_predictor.
    """
    return (predictor or self.mask_predictor)(queries, instance_embeds)

  def mask_predictor_for(self, level: Level) -> MaskPredictor:
    return getattr(self, MASK_PREDICTORS[level])

  def __call__(self, fpn: list[jax.Array], hs_last: jax.Array, memory: jax.Array, prompt: jax.Array,
               prompt_mask: jax.Array, level: Level | str = Level.CONCEPT
               ) -> tuple[jax.Array, jax.Array]:
    """hs_last (B, Q, D) last-layer decoder queries; other inputs as `pixel_embeddings`; level
    (static) picks the mask predictor. Returns (pred_masks (B, Q, 4g, 4g), semantic_seg
    (B, 1, 4g, 4g)), logits."""
    instance_embeds, semantic = self.pixel_embeddings(fpn, memory, prompt, prompt_mask)
    predictor = self.mask_predictor_for(parse_level(level))
    return self.predict_masks(hs_last, instance_embeds, predictor), semantic
