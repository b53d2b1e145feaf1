"""The SAM 3 vision backbone: ViT trunk + SimpleFPN neck (sam3/model/necks.py, Sam3DualViTDetNeck).

Attribute names mirror `backbone.vision_backbone.*`. The image path keeps the 4x, 2x and 1x scales
(the reference's SAM3VLBackbone has scalp=1); SAM 3's 0.5x branch `convs.3` exists only so that
sam3.pt converts with zero unexpected keys (SAM 3.1's neck has no such branch: Sam3Config.variant).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import conv, gelu
from sam3i_jax.models.position_encoding import sine_map
from sam3i_jax.models.vit import ViT

NUM_FPN_SCALES = 3  # the 4x, 2x and 1x branches; SAM 3's scalp = 1 drops its 0.5x one


class ConvTranspose2x2(nnx.Module):
  """torch.nn.ConvTranspose2d(kernel_size=2, stride=2) on NHWC maps.

  With k = s = 2 every output pixel comes from exactly one input pixel, so the layer is one einsum
  plus a reshape. `weight` is kept in torch's (in, out, 2, 2) layout as a raw parameter, so the
  converter copies it untransformed.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    # torch's default init; its fan_in for a transposed conv is weight.size(1) * k * k.
    bound = 1.0 / math.sqrt(out_features * 4)
    self.weight = nnx.Param(jax.random.uniform(rngs.params(), (in_features, out_features, 2, 2),
                                               jnp.float32, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_features,), jnp.float32, -bound, bound))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, H, W, I) -> (B, 2H, 2W, O); out[2i+k, 2j+l] = x[i, j] @ weight[:, :, k, l] + bias."""
    b, h, w, _ = x.shape
    weight = self.weight[...].astype(self.dtype)
    y = jnp.einsum("bhwi,iokl->bhkwlo", x.astype(self.dtype), weight)
    return y.reshape(b, 2 * h, 2 * w, weight.shape[1]) + self.bias[...].astype(self.dtype)


class NeckBranch(nnx.Module):
  """One SimpleFPN scale (an nn.Sequential in the reference; children keep its names).

  4x: dconv_2x2_0, GELU, dconv_2x2_1; 2x: dconv_2x2; 1x: nothing; 0.5x: 2x2 max pool;
  then conv_1x1 (-> d_model) and conv_3x3 (pad 1), all with bias and no norm.
  """

  def __init__(self, dim: int, d_model: int, scale: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.scale = float(scale)
    if scale == 4.0:
      self.dconv_2x2_0 = ConvTranspose2x2(dim, dim // 2, rngs=rngs, dtype=dtype)
      self.dconv_2x2_1 = ConvTranspose2x2(dim // 2, dim // 4, rngs=rngs, dtype=dtype)
      out_dim = dim // 4
    elif scale == 2.0:
      self.dconv_2x2 = ConvTranspose2x2(dim, dim // 2, rngs=rngs, dtype=dtype)
      out_dim = dim // 2
    elif scale in (1.0, 0.5):
      out_dim = dim
    else:
      raise NotImplementedError(f"scale factor {scale} is not supported")
    self.conv_1x1 = conv(out_dim, d_model, 1, rngs=rngs, dtype=dtype)
    self.conv_3x3 = conv(d_model, d_model, 3, padding=1, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, g, g, dim) -> (B, g * scale, g * scale, d_model)."""
    if self.scale == 4.0:
      x = self.dconv_2x2_1(gelu(self.dconv_2x2_0(x)))
    elif self.scale == 2.0:
      x = self.dconv_2x2(x)
    elif self.scale == 0.5:
      b, h, w, c = x.shape  # MaxPool2d(2, 2) floors odd sizes
      x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return self.conv_3x3(self.conv_1x1(x))


class VisionNeck(nnx.Module):
  """`backbone.vision_backbone`: images (B, H, W, 3) -> (fpn, pos).

  fpn: [(B, 4g, 4g, D), (B, 2g, 2g, D), (B, g, g, D)] with D = d_model, g = the token grid;
  pos: the matching sine position maps, each (h, w, D) without a batch dimension.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    dtype = config.compute_dtype
    self.d_model = config.d_model
    self.dtype = dtype
    self.trunk = ViT(config, rngs=rngs)
    self.convs = nnx.List([NeckBranch(config.vit_dim, config.d_model, s, rngs=rngs, dtype=dtype)
                           for s in config.neck_scale_factors])

  def __call__(self, images: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    x = self.trunk(images)
    fpn = [self.convs[i](x) for i in range(NUM_FPN_SCALES)]
    pos = [jnp.asarray(sine_map(f.shape[1], f.shape[2], self.d_model), dtype=self.dtype) for f in fpn]
    return fpn, pos
