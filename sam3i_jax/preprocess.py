"""Image loading and SAM 3's input transform, in numpy (host side).

`Sam3Processor` applies `v2.Compose([ToDtype(uint8, scale=True), Resize((S, S)),
ToDtype(float32, scale=True), Normalize(0.5, 0.5)])` to the image: a square resize that does not
keep the aspect ratio, bilinear with antialias on uint8 pixels, then [0, 1], then [-1, 1].

torchvision resizes a uint8 image in one of two ways, which differ by one grey level on some
pixels:
- "uint8" (CPU, AVX2/AVX512/ARM): torch's native uint8 kernel, ported from Pillow-SIMD:
  PIL-style triangle-filter weights in float64, quantised to int16 with a per-axis precision,
  a horizontal pass rounded to uint8, then a vertical pass rounded to uint8.
- "float" (CUDA, and CPUs without AVX2): cast to float32, the same separable antialiased filter
  in floating point (no intermediate rounding), then round half to even back to uint8.
Both are implemented here with gathers over the few taps each output pixel has; "uint8" is
bit-exact with torch on CPU and is the default (it is what our tests can check exactly).

This runs on the host in numpy rather than in JAX: the result must be bit-exact integer
arithmetic, it depends on the input size (a fresh XLA compile per image size otherwise), and it
costs what torchvision does on one CPU thread (about 40 ms for 640x480, 0.5 s for a 12-megapixel photo).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageOps

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
RESIZE_MODES = ("uint8", "float")


def load_image(path: str | os.PathLike, exif_transpose: bool = False) -> np.ndarray:
  """uint8 (H, W, 3) RGB pixels of an image file.

  Like sam3 (`Image.open(path).convert("RGB")`), the EXIF orientation tag is ignored by
  default: `Sam3Processor` never applies it, so a rotated photo is seen as stored.
  `exif_transpose=True` applies it (the prediction then differs from the reference's).
  """
  with Image.open(path) as image:
    if exif_transpose:
      image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _triangle(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, 1.0 - x, 0.0)


def _filter_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(first input index (out,), tap count (out,), normalised float64 weights (out, K)).

  PIL's antialiased bilinear support: output pixel i covers input centre s*(i+0.5), s=in/out,
  with a triangle filter stretched by s when downscaling; weights renormalised at the borders.
  Operation order follows torch's `_compute_weights_aa` so the float64 weights are identical.
  """
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0
  inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
  taps = int(math.ceil(support)) * 2 + 1
  center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
  # C++ casts truncate toward zero; these values are clamped at 0 anyway.
  start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - start
  weights = np.zeros((out_size, taps), np.float64)
  total = np.zeros(out_size, np.float64)
  for j in range(taps):  # sequential sum, as in the reference (numpy's pairwise sum differs)
    w = _triangle(((start + j).astype(np.float64) - center + 0.5) * inv_scale)
    w = np.where(j < count, w, 0.0)
    weights[:, j] = w
    total += w
  weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None],
                     weights)
  return start, count, weights


def _int16_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
  """Weights as integers of `precision` fractional bits (the largest that keeps them < 2**15)."""
  w_max = float(weights.max())
  precision = 0
  while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  return np.trunc(0.5 + weights * (1 << precision)).astype(np.int32), precision


def _resize_axis(x: np.ndarray, out_size: int, axis: int, mode: str) -> np.ndarray:
  """Antialiased bilinear resize of `x` along `axis` (uint8 in/out for "uint8", float64 else)."""
  in_size = x.shape[axis]
  start, count, weights = _filter_taps(in_size, out_size)
  index = np.minimum(start[:, None] + np.arange(weights.shape[1]), in_size - 1)
  shape = [1] * x.ndim
  shape[axis] = out_size
  if mode == "uint8":
    int_weights, precision = _int16_weights(weights)
    acc = np.full(1, 1 << (precision - 1), np.int32)
    for j in range(weights.shape[1]):
      if not int_weights[:, j].any():
        continue
      taps = np.take(x, index[:, j], axis=axis).astype(np.int32)
      acc = acc + taps * int_weights[:, j].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)
  acc = np.zeros(1, np.float64)
  for j in range(weights.shape[1]):
    acc = acc + np.take(x, index[:, j], axis=axis) * weights[:, j].reshape(shape)
  return acc


def resize_uint8(image: np.ndarray, height: int, width: int, mode: str = "uint8") -> np.ndarray:
  """torchvision `Resize((height, width))` (bilinear, antialias) of a uint8 (H, W, C) image."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"expected uint8 (H, W, C), got {image.dtype} {image.shape}")
  if image.shape[:2] == (height, width):
    return image.copy()
  x = image if mode == "uint8" else image.astype(np.float64)
  if x.shape[1] != width:  # horizontal pass first, as torch and PIL do
    x = _resize_axis(x, width, 1, mode)
  if x.shape[0] != height:
    x = _resize_axis(x, height, 0, mode)
  if mode == "float":
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)  # torch.round: half to even
  return x


def to_uint8(image: np.ndarray) -> np.ndarray:
  """`v2.ToDtype(torch.uint8, scale=True)`: uint8 kept, float in [0, 1] -> trunc(x * 255.999)."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    scaled = image * image.dtype.type(255.0 + 1.0 - 1e-3)
    return scaled.astype(np.uint8)  # float -> uint8 truncates, as torch's .to(uint8)
  raise ValueError(f"unsupported image dtype {image.dtype} (use uint8 or float in [0, 1])")


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] with torchvision's float32 operations (x * (1/255) - 0.5) / 0.5."""
  x = image.astype(np.float32) * np.float32(1.0 / 255.0)
  return (x - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


def denormalize(image: np.ndarray) -> np.ndarray:
  """Inverse of `normalize` for display: float in [-1, 1] -> uint8 (rounded)."""
  x = np.asarray(image, np.float32) * np.float32(IMAGE_STD) + np.float32(IMAGE_MEAN)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, size: int = 1008, mode: str = "uint8") -> np.ndarray:
  """SAM 3's input transform: float32 (size, size, 3) in [-1, 1] from an (H, W, 3) image.

  `image` is uint8 RGB (or float in [0, 1], converted as `ToDtype(uint8, scale=True)` does).
  The aspect ratio is not kept. `mode` picks torchvision's CPU ("uint8", default) or CUDA
  ("float") resize arithmetic; see the module docstring.
  """
  image = to_uint8(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
  return normalize(resize_uint8(image, size, size, mode))
