"""SAM 3's geometry (box / point exemplar) prompt encoder (SequenceGeometryEncoder in
sam3/model/geometry_encoders.py, as sam3/model_builder.py configures it).

Each prompt token = direct projection + pooled image feature + projected sine encoding + label
embedding. The sequence points ++ boxes ++ CLS is assembled as right-padded sequences
(`concat_padded`), projected and normed, then refined by pre-norm layers that attend to each
other (no positional term) and to the raw image tokens (keys carry the sine position map,
values do not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models import position_encoding
from sam3i_jax.box_ops import box_cxcywh_to_xyxy
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.encoder import TransformerEncoderLayer
from sam3i_jax.models.layers import conv, dense, layer_norm
from sam3i_jax.models.roi_align import roi_align


def concat_padded(seq1: jax.Array, mask1: jax.Array, seq2: jax.Array,
                  mask2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Concatenates two right-padded sequences into one right-padded sequence.

  seq1 (B, L1, D), mask1 (B, L1), seq2 (B, L2, D), mask2 (B, L2); masks True = padding and each
  row's padding is at its end. Returns (B, L1 + L2, D) and its mask. As in the reference, seq2
  is written right after seq1's valid entries; slots past the valid length keep whatever seq1 or
  zeros held there (they are padding).
  """
  batch, len1 = mask1.shape
  len2 = mask2.shape[1]
  n1 = jnp.sum(~mask1, axis=-1)
  n2 = jnp.sum(~mask2, axis=-1)
  out = jnp.concatenate([seq1, jnp.zeros((batch, len2) + seq1.shape[2:], seq1.dtype)], axis=1)
  index = jnp.arange(len2)[None, :] + n1[:, None]
  out = out.at[jnp.arange(batch)[:, None], index].set(seq2.astype(out.dtype))
  mask = jnp.arange(len1 + len2)[None, :] >= (n1 + n2)[:, None]
  return out, mask


def grid_sample_points(features: jax.Array, points_xy: jax.Array) -> jax.Array:
  """torch grid_sample(bilinear, padding zeros, align_corners=False) at normalised points.

  features (B, H, W, C); points_xy (B, N, 2) in [0, 1] (x, y). Returns (B, N, C).
  """
  b, height, width, c = features.shape
  x = points_xy[..., 0].astype(jnp.float32) * width - 0.5
  y = points_xy[..., 1].astype(jnp.float32) * height - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  flat = features.reshape(b, height * width, c)
  out = jnp.zeros(points_xy.shape[:2] + (c,), jnp.float32)
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      weight = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      index = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
      value = jnp.take_along_axis(flat, index[..., None], axis=1).astype(jnp.float32)
      out = out + jnp.where(inside, weight, 0.0)[..., None] * value
  return out.astype(features.dtype)


class GeometryEncoder(nnx.Module):
  """Box (and point) prompts -> prompt tokens; mirrors `geometry_encoder.` of the PyTorch model."""

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, config.compute_dtype
    self.d_model, self.roi_size, self.dtype = d, config.roi_size, dtype

    def embed(n):
      return nnx.Embed(n, d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    self.label_embed = embed(2)  # 0 = negative, 1 = positive
    self.cls_embed = embed(1)
    self.points_direct_project = dense(2, d, rngs=rngs, dtype=dtype)
    self.points_pool_project = dense(d, d, rngs=rngs, dtype=dtype)
    self.points_pos_enc_project = dense(d, d, rngs=rngs, dtype=dtype)
    self.boxes_direct_project = dense(4, d, rngs=rngs, dtype=dtype)
    self.boxes_pool_project = conv(d, d, config.roi_size, rngs=rngs, dtype=dtype)  # roi -> 1x1
    self.boxes_pos_enc_project = dense(d + 2, d, rngs=rngs, dtype=dtype)
    self.final_proj = dense(d, d, rngs=rngs, dtype=dtype)
    self.norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.img_pre_norm = layer_norm(d, rngs=rngs, dtype=dtype)
    self.encode = nnx.List([
        TransformerEncoderLayer(config, rngs=rngs, pos_enc_at_attn=False,
                                pos_enc_at_cross_attn_keys=True)
        for _ in range(config.num_geo_layers)])
    self.encode_norm = layer_norm(d, rngs=rngs, dtype=dtype)

  def _labels(self, labels: jax.Array) -> jax.Array:
    return self.label_embed(labels.astype(jnp.int32))

  def encode_boxes(self, boxes: jax.Array, labels: jax.Array, pooled_feats: jax.Array) -> jax.Array:
    """boxes (B, N, 4) normalised cxcywh, labels (B, N), pooled_feats = img_pre_norm(image)
    (B, h, w, D) -> (B, N, D)."""
    b, n = boxes.shape[:2]
    _, h, w, d = pooled_feats.shape
    boxes = boxes.astype(jnp.float32)
    embed = self.boxes_direct_project(boxes)
    # Normalised boxes -> feature pixels of the (h, w) map; roi_align as torchvision with
    # spatial_scale 1, adaptive sampling, aligned=False.
    xyxy = box_cxcywh_to_xyxy(boxes) * jnp.asarray([w, h, w, h], jnp.float32)
    rois = roi_align(pooled_feats, xyxy, self.roi_size)  # (B, N, r, r, D)
    pooled = self.boxes_pool_project(rois.reshape(b * n, self.roi_size, self.roi_size, d))
    embed = embed + pooled.reshape(b, n, d)
    sine = position_encoding.encode_boxes(boxes, self.d_model)  # cat(y(cy), x(cx), h, w)
    embed = embed + self.boxes_pos_enc_project(sine)
    return embed + self._labels(labels)

  def encode_points(self, points: jax.Array, labels: jax.Array, pooled_feats: jax.Array) -> jax.Array:
    """points (B, N, 2) normalised xy, labels (B, N) -> (B, N, D)."""
    points = points.astype(jnp.float32)
    embed = self.points_direct_project(points)
    embed = embed + self.points_pool_project(grid_sample_points(pooled_feats, points))
    # Points use cat(enc(x), enc(y)) (x first), unlike boxes.
    f = self.d_model // 2
    yx = position_encoding.encode_points(points, labels, self.d_model)
    sine = jnp.concatenate([yx[..., f:2 * f], yx[..., :f]], axis=-1)
    embed = embed + self.points_pos_enc_project(sine)
    return embed + self._labels(labels)

  def __call__(self, boxes: jax.Array, box_labels: jax.Array, box_mask: jax.Array,
               image_features: jax.Array, image_pos: jax.Array, *, points: jax.Array | None = None,
               point_labels: jax.Array | None = None,
               point_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes a right-padded set of box (and optionally point) prompts per batch row.

    Args:
      boxes: (B, N, 4) normalised cxcywh; N may be 0.
      box_labels: (B, N) bool or int, True / 1 = positive.
      box_mask: (B, N) bool, True = padding (padding must come after the valid boxes).
      image_features: (B, h, w, D) raw image tokens (the 1x FPN scale).
      image_pos: (h, w, D) or (B, h, w, D) sine position map of that level.
      points, point_labels, point_mask: optional (B, P, 2) normalised xy, (B, P), (B, P).

    Returns:
      tokens (B, P + N + 1, D) and pad_mask (B, P + N + 1) (True = padding). Valid tokens come
      first (points, then boxes, then the CLS token), so with no padding the CLS token is last.
    """
    b, h, w, d = image_features.shape
    dtype = self.dtype
    memory = image_features.reshape(b, h * w, d).astype(dtype)
    pos = jnp.broadcast_to(image_pos.reshape(-1, h * w, d), (b, h * w, d)).astype(dtype)
    pooled_feats = self.img_pre_norm(image_features)

    seq = jnp.zeros((b, 0, d), dtype)
    mask = jnp.zeros((b, 0), bool)
    if points is not None and points.shape[1] > 0:
      if point_labels is None:
        point_labels = jnp.ones(points.shape[:2], jnp.int32)
      if point_mask is None:
        point_mask = jnp.zeros(points.shape[:2], bool)
      points = jnp.where(point_mask[..., None], 0.0, points.astype(jnp.float32))
      point_labels = jnp.where(point_mask, 0, point_labels.astype(jnp.int32))
      seq, mask = self.encode_points(points, point_labels, pooled_feats), point_mask
    if boxes.shape[1] > 0:
      # Padding slots only ever reach padded tokens, but a NaN there would still leak through
      # attention (0 * NaN); give them the all-zero box a data pipeline pads with.
      boxes = jnp.where(box_mask[..., None], 0.0, boxes.astype(jnp.float32))
      box_labels = jnp.where(box_mask, 0, box_labels.astype(jnp.int32))
      box_embeds = self.encode_boxes(boxes, box_labels, pooled_feats)
      seq, mask = concat_padded(seq, mask, box_embeds, box_mask)
    cls = jnp.broadcast_to(self.cls_embed.embedding[...].astype(dtype)[None], (b, 1, d))
    seq, mask = concat_padded(seq, mask, cls, jnp.zeros((b, 1), bool))

    x = self.norm(self.final_proj(seq))
    for layer in self.encode:
      x = layer(x, memory, pos=pos, tgt_key_padding_mask=mask)
    return self.encode_norm(x), mask
