"""The assembled SAM 3 image model (grounding path): `Sam3Image`, mirroring sam3/model/sam3_image.py.

Data flow (batch-first, NHWC):
  images (B,S,S,3) -> backbone.vision_backbone -> FPN scales [4g, 2g, g] + sine positions
  token ids (B,32) -> backbone.language_backbone -> text tokens (B,32,D) + padding mask
  boxes (B,N,4) -> geometry_encoder -> N+1 prompt tokens;  prompt = text ++ geometry
  transformer.encoder fuses image tokens with the prompt; transformer.decoder predicts Q boxes + presence;
  dot_prod_scoring gives the logits; segmentation_head the instance and semantic masks.

SAM3-I (config.adapters): every method that runs the text, fusion-encoder, decoder or mask path takes
the instruction `level` (static; see levels.py). The concept level is SAM 3 itself, bit for bit; the
simple and complex levels run the adapters. `instruction_embedding` is stage 3's projection head.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.box_ops import box_cxcywh_to_xyxy
from sam3i_jax.models.adapters import ProjectionHead
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.decoder import TransformerDecoder, inverse_sigmoid
from sam3i_jax.models.encoder import TransformerEncoderFusion
from sam3i_jax.models.geometry_encoder import GeometryEncoder
from sam3i_jax.models.heads import DotProductScoring, SegmentationHead
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.neck import VisionNeck
from sam3i_jax.models.text_encoder import TextEncoder

Outputs = dict[str, Any]
JOINT_LOGIT_CLAMP = 10.0  # Sam3Image._update_scores_and_boxes


class ImageFeatures(NamedTuple):
  """The image side, computed once per image and reused for any number of prompts."""
  fpn: list  # [(B,4g,4g,D), (B,2g,2g,D), (B,g,g,D)]
  pos: list  # matching sine position maps, (h, w, D) each


class TextFeatures(NamedTuple):
  tokens: jax.Array  # (B, L, D) after the resizer
  pad_mask: jax.Array  # (B, L) True = padding


class Sam3VLBackbone(nnx.Module):
  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.vision_backbone = VisionNeck(config, rngs=rngs)
    self.language_backbone = TextEncoder(config, rngs=rngs)


class TransformerWrapper(nnx.Module):
  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.encoder = TransformerEncoderFusion(config, rngs=rngs)
    self.decoder = TransformerDecoder(config, rngs=rngs)


class Sam3Image(nnx.Module):
  """SAM 3's image model (SAM3-I's with config.adapters). Eval mode by default; `model.train()`
  enables dropout, drop path and DAC."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Sam3VLBackbone(config, rngs=rngs)
    self.geometry_encoder = GeometryEncoder(config, rngs=rngs)
    self.transformer = TransformerWrapper(config, rngs=rngs)
    self.dot_prod_scoring = DotProductScoring(config, rngs=rngs)
    self.segmentation_head = SegmentationHead(config, rngs=rngs)
    if config.adapters:
      # One module: the released stage-3 config shares it (share_mlp_params) as
      # complex_query_proj and concept_proj too.
      self.simple_query_proj = ProjectionHead(config.d_model, rngs=rngs, dtype=config.compute_dtype)

  def _level(self, level: Level | str) -> Level:
    return parse_level(level, self.config.adapters)

  # --- the two encoders --------------------------------------------------------------------
  def encode_image(self, images: jax.Array) -> ImageFeatures:
    """images: (B, S, S, 3) normalised to [-1, 1] (see sam3i_jax.preprocess)."""
    expected = (self.config.img_size, self.config.img_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    fpn, pos = self.backbone.vision_backbone(images)
    return ImageFeatures(list(fpn), list(pos))

  def encode_text(self, token_ids: jax.Array, level: Level | str = Level.CONCEPT) -> TextFeatures:
    """token_ids: (B, context_length) int, 0 = padding (see sam3i_jax.tokenizer); level: static."""
    tokens, pad_mask, _ = self.backbone.language_backbone(token_ids, self._level(level))
    return TextFeatures(tokens, pad_mask)

  def instruction_embedding(self, text: TextFeatures) -> jax.Array:
    """Stage 3's projected instruction feature (B, D): simple_query_proj of the mean of all L token
    features, padding positions included, as the reference pools them."""
    if not self.config.adapters:
      raise ValueError("instruction_embedding needs the SAM3-I adapters (Sam3Config.adapters=False)")
    return self.simple_query_proj(text.tokens.astype(jnp.float32).mean(axis=1))

  # --- prompt -> detections --------------------------------------------------------------------
  def encode_prompt(self, image: ImageFeatures, text: TextFeatures, boxes=None, box_labels=None,
                    box_mask=None) -> tuple[jax.Array, jax.Array]:
    """prompt = text tokens ++ geometry tokens (boxes then CLS), with its padding mask."""
    batch = text.tokens.shape[0]
    if boxes is None:
      boxes = jnp.zeros((batch, 0, 4), jnp.float32)
    if box_labels is None:
      box_labels = jnp.ones(boxes.shape[:2], bool)
    if box_mask is None:
      box_mask = jnp.zeros(boxes.shape[:2], bool)
    geo, geo_mask = self.geometry_encoder(boxes, box_labels, box_mask, image.fpn[-1], image.pos[-1])
    prompt = jnp.concatenate([text.tokens.astype(geo.dtype), geo], axis=1)
    return prompt, jnp.concatenate([text.pad_mask, geo_mask], axis=1)

  def ground(self, image: ImageFeatures, text: TextFeatures, boxes=None, box_labels=None,
             box_mask=None, *, level: Level | str = Level.CONCEPT) -> Outputs:
    """Detection and segmentation for one prompt per batch row (image row i with text row i).
    `text` must come from encode_text at the same level."""
    level = self._level(level)
    prompt, prompt_mask = self.encode_prompt(image, text, boxes, box_labels, box_mask)
    feat = image.fpn[-1]
    b, h, w, d = feat.shape
    memory = self.transformer.encoder(feat.reshape(b, h * w, d), image.pos[-1].reshape(h * w, d),
                                      prompt, prompt_mask, level)
    return self.heads(image, memory, prompt, prompt_mask, (h, w), level)

  def heads(self, image: ImageFeatures, memory: jax.Array, prompt: jax.Array,
            prompt_mask: jax.Array, grid: tuple[int, int], level: Level | str = Level.CONCEPT
            ) -> Outputs:
    """Decoder, scoring, boxes and masks on top of the fused image tokens `memory` (B, g*g, D)."""
    level = self._level(level)
    decoder = self.transformer.decoder
    pos = image.pos[-1].reshape(grid[0] * grid[1], -1)
    dec = decoder(memory, pos, prompt, prompt_mask, grid, level)
    hs, refs, presence = dec["hs"], dec["ref_boxes"], dec["presence_logits"]
    logits = self.dot_prod_scoring(hs, prompt, prompt_mask)
    if self.config.joint_presence_scores:
      logits = joint_presence_logits(logits, presence)
    boxes = decoder.refine(refs, hs)
    pred_masks, semantic_seg = self.segmentation_head(image.fpn, hs[-1], memory, prompt, prompt_mask,
                                                      level)
    return self._collect(logits, boxes, presence, hs[-1], pred_masks, semantic_seg)

  def _collect(self, logits, boxes, presence, queries, pred_masks, semantic_seg) -> Outputs:
    """Names the outputs as the reference does; in training adds per-layer aux and o2m outputs."""
    q = self.config.num_queries
    xyxy = box_cxcywh_to_xyxy(boxes)
    per_layer = {"pred_logits": logits, "pred_boxes": boxes, "pred_boxes_xyxy": xyxy}
    out: Outputs = {k: v[-1, :, :q] for k, v in per_layer.items()}
    out.update(pred_masks=pred_masks[:, :q], semantic_seg=semantic_seg, presence_logit=presence[-1],
               queries=queries[:, :q])
    if logits.shape[2] == q:  # eval: no one-to-many queries, no aux outputs
      return out
    out["aux_outputs"] = [
        {**{k: v[layer, :, :q] for k, v in per_layer.items()}, "presence_logit": presence[layer]}
        for layer in range(logits.shape[0] - 1)]
    out.update({f"{k}_o2m": v[-1, :, q:] for k, v in per_layer.items()})
    out["pred_masks_o2m"] = pred_masks[:, q:]
    out["aux_outputs_o2m"] = [{f"{k}_o2m": v[layer, :, q:] for k, v in per_layer.items()}
                              for layer in range(logits.shape[0] - 1)]
    return out

  def __call__(self, images: jax.Array, token_ids: jax.Array, boxes=None, box_labels=None,
               box_mask=None, *, level: Level | str = Level.CONCEPT) -> Outputs:
    """images (B,S,S,3), token_ids (B,L), optional boxes (B,N,4) cxcywh in [0,1] with labels (B,N)
    (True = positive) and mask (B,N) (True = padding); level (static): the instruction level of
    every row. Returns pred_logits (B,Q,1), pred_boxes (B,Q,4) cxcywh, pred_boxes_xyxy, pred_masks
    (B,Q,4g,4g), semantic_seg (B,1,4g,4g), presence_logit (B,1), queries (B,Q,D); in training also
    aux_outputs and *_o2m."""
    level = self._level(level)
    return self.ground(self.encode_image(images), self.encode_text(token_ids, level), boxes,
                       box_labels, box_mask, level=level)


def joint_presence_logits(logits: jax.Array, presence: jax.Array) -> jax.Array:
  """SAM 3.1's scores (Sam3Image with supervise_joint_box_scores): the query logits (..., Q, 1)
  with each layer's presence (..., 1) folded in, clamp(inverse_sigmoid(sigmoid(l) * sigmoid(p)),
  -10, 10); a presence score applied twice would square it."""
  joint = jax.nn.sigmoid(logits.astype(jnp.float32)) * jax.nn.sigmoid(
      presence.astype(jnp.float32))[..., None, :]
  return jnp.clip(inverse_sigmoid(joint), -JOINT_LOGIT_CLAMP, JOINT_LOGIT_CLAMP).astype(logits.dtype)


def host_counted_rngs(seed: int = 0) -> nnx.Rngs:
  """nnx.Rngs(seed) (the same keys) whose call counter is a host integer.

  Building a model under a trace (nnx.eval_shape, jax.jit) with the usual traced counter costs time
  quadratic in the model size: every rng call probes the tracer's `sharding`, and JAX formats an
  error message that walks the whole trace. The full-size model's eval_shape took 34 s, 3.7 s here.
  """
  rngs = nnx.Rngs(seed)
  rngs.default.count.set_raw_value(np.zeros((), np.uint32).view(_HostCounter))
  return rngs


def seed_dropout_streams(model: nnx.Module, key: jax.Array) -> None:
  """Restarts every RNG stream of `model` (dropout, drop path) from its own key, counters at 0:
  stream i (in the model's flat state order), layer l of a stacked one, gets
  fold_in(fold_in(key, i), l). A model built from a seed and one loaded from disk (whose streams
  `pretrained.materialise` starts all from one key) then draw the same masks from here on."""
  keys = nnx.to_flat_state(nnx.state(model, nnx.RngKey))
  for i, (_, variable) in enumerate(keys):
    shape = variable.get_value().shape
    layers = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32)
    variable.set_value(jax.vmap(lambda l, k=jax.random.fold_in(key, i): jax.random.fold_in(k, l))(
        layers).reshape(shape) if shape else jax.random.fold_in(key, i))
  counts = nnx.to_flat_state(nnx.state(model, nnx.RngCount))
  for _, variable in counts:
    variable.set_value(jnp.zeros_like(variable.get_value()))
  nnx.update(model, nnx.from_flat_state(keys), nnx.from_flat_state(counts))


class _HostCounter(np.ndarray):
  """A 0-d counter whose reads are copies. The stream computes `fold_in(key, count[...])` and then
  increments the counter in place; JAX may alias a numpy buffer zero-copy while the dispatch is
  still in flight, so a view would let the increment race the key derivation (different
  initialisations from the same seed)."""

  def __getitem__(self, index):
    value = super().__getitem__(index)
    return value.copy() if isinstance(value, np.ndarray) else value


def abstract_model(config: Sam3Config) -> Sam3Image:
  """The model's structure with jax.ShapeDtypeStruct leaves (no parameter is materialised)."""
  return nnx.eval_shape(lambda: Sam3Image(config, rngs=host_counted_rngs()))
