"""COCO segmentations: validation, conversion to compressed RLE, canvas masks at the loss's size.

Every segmentation is validated before pycocotools sees it: its C decoder writes one byte per run
length without a bounds check, so a corrupt RLE whose runs add up to more than h*w pixels would
overwrite memory instead of failing.

Canvas masks. Training images are resized to s x s and padded bottom/right to the S x S canvas;
the loss needs each target on the M x M prediction grid of that canvas. The straightforward path
decodes the mask, resizes it to s x s (bilinear, antialiased, rounded), pads it to S x S and
downsamples to M x M with the reference's rule for targets (bilinear, align_corners=False, > 0).
`canvas_masks` gives the same result without building any S x S array: bilinear with
align_corners=False reads (at most) two canvas pixels per axis for each grid cell, and "> 0" keeps
a cell when any tap of non-zero weight is set, so a cell is the OR of a 2 x 2 block of canvas
pixels. Each canvas pixel inside the content is taken from the source pixel that contains its
centre (nearest), each one outside it is padding (0). Only the resized mask's anti-aliasing
(a 50% area vote where the source is finer than the canvas) is replaced by the nearest sample, so
the two paths differ on a thin band along the mask edges (tests: >= 99% equal pixels).
Cost: two gathers of (M, w) and (M, M) elements per mask instead of an (S, S) resize.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils

_RLE_CHAR_MIN = 48  # compressed RLE counts are ASCII 48..111: 5 payload bits + 1 continuation bit
_RLE_CHAR_MAX = 48 + 63


class SegmentationError(ValueError):
  """A segmentation that is not a valid COCO polygon list or RLE of the stated size."""


def decode_rle_counts(counts: bytes | str) -> list[int]:
  """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`), validated."""
  data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
  runs: list[int] = []
  pos, end = 0, len(data)
  while pos < end:
    value, shift, more = 0, 0, True
    while more:
      if pos >= end:
        raise SegmentationError("RLE counts string ends inside a number")
      code = data[pos]
      if not _RLE_CHAR_MIN <= code <= _RLE_CHAR_MAX:
        raise SegmentationError(f"RLE counts has an invalid character {chr(code)!r}")
      code -= _RLE_CHAR_MIN
      value |= (code & 0x1F) << shift
      more = bool(code & 0x20)
      pos += 1
      shift += 5
      if not more and code & 0x10:
        value |= -1 << shift
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def _check_runs(runs: Sequence[int], height: int, width: int) -> None:
  if any(r < 0 for r in runs):
    raise SegmentationError("RLE has a negative run length")
  if sum(runs) != height * width:
    raise SegmentationError(f"RLE runs cover {sum(runs)} pixels, size {height}x{width} has "
                            f"{height * width}")


def is_finite_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def to_compressed_rle(segmentation: Any, height: int, width: int) -> tuple[bytes, tuple[int, int]]:
  """(compressed counts, (h, w)) of a COCO segmentation: polygons, RLE or uncompressed RLE.

  Polygons are rasterised at the image's (height, width), as the reference does; an RLE keeps its
  own size. Raises SegmentationError naming what is wrong.
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise SegmentationError("empty polygon list")
    for k, poly in enumerate(segmentation):
      if not isinstance(poly, list) or not all(is_finite_number(v) for v in poly):
        raise SegmentationError(f"polygon {k} is not a flat list of finite numbers")
      if len(poly) < 6 or len(poly) % 2:
        raise SegmentationError(f"polygon {k} has {len(poly)} coordinates (need an even "
                                "number >= 6)")
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    return bytes(rle["counts"]), (height, width)
  if not isinstance(segmentation, dict):
    raise SegmentationError(f"segmentation is a {type(segmentation).__name__}, expected polygons "
                            "or an RLE dict")
  size, counts = segmentation.get("size"), segmentation.get("counts")
  if (not isinstance(size, (list, tuple)) or len(size) != 2
      or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
    raise SegmentationError(f"RLE size {size!r} is not [height, width] of positive integers")
  h, w = int(size[0]), int(size[1])
  if isinstance(counts, list):
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
      raise SegmentationError("uncompressed RLE counts are not all integers")
    _check_runs(counts, h, w)
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return bytes(rle["counts"]), (h, w)
  if isinstance(counts, (str, bytes)):
    _check_runs(decode_rle_counts(counts), h, w)
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts), (h, w)
  raise SegmentationError(f"RLE counts is a {type(counts).__name__}, expected a string or a list")


def _taps(grid: int, canvas: int, content: int, source: int) -> tuple[np.ndarray, np.ndarray]:
  """Source pixel (grid, 2) and validity (grid, 2) of the two bilinear taps of each grid cell.

  torch's `interpolate(bilinear, align_corners=False)` from `canvas` to `grid` samples
  x = max((i + 0.5) * canvas / grid - 0.5, 0) from pixels floor(x) and floor(x) + 1 (clamped),
  weights 1 - frac and frac. A tap counts if its weight is non-zero and its canvas pixel lies in
  the content (the rest of the canvas is padding); it reads the source pixel containing the
  canvas pixel's centre.
  """
  x = np.maximum((np.arange(grid, dtype=np.float64) + 0.5) * (canvas / grid) - 0.5, 0.0)
  lo = np.floor(x).astype(np.int64)
  hi = np.minimum(lo + 1, canvas - 1)
  frac = x - lo
  pixels = np.stack([lo, hi], axis=1)
  valid = np.stack([frac < 1.0, frac > 0.0], axis=1) & (pixels < content)
  index = np.minimum(((pixels + 0.5) * (source / content)).astype(np.int64), source - 1)
  return np.where(valid, index, 0), valid


def _resample(decoded: np.ndarray, grid: int, canvas: int, content: int) -> np.ndarray:
  """(grid, grid, N) bool canvas masks of decoded (h, w, N) masks; see the module docstring."""
  h, w = decoded.shape[:2]
  rows, row_ok = _taps(grid, canvas, content, h)
  cols, col_ok = _taps(grid, canvas, content, w)
  mask = decoded.view(np.bool_)
  by_row = (mask[rows[:, 0]] & row_ok[:, :1, None]) | (mask[rows[:, 1]] & row_ok[:, 1:, None])
  return ((by_row[:, cols[:, 0]] & col_ok[None, :, :1])
          | (by_row[:, cols[:, 1]] & col_ok[None, :, 1:]))


def canvas_masks(rles: Sequence[bytes], sizes: np.ndarray, fill_boxes: np.ndarray, *, grid: int,
                 canvas: int, content: int) -> np.ndarray:
  """(N, grid, grid) bool masks of N RLEs on the canvas grid; the content is its top-left corner.

  `sizes` (N, 2) are the RLEs' (h, w). `fill_boxes` (N, 4) are xyxy boxes normalised to [0, 1]:
  an empty mask is replaced by its box, as the reference's `DecodeRle` does.
  """
  out = np.zeros((len(rles), grid, grid), np.bool_)
  if not len(rles):
    return out
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  for size in np.unique(sizes, axis=0):  # one decode + resample per distinct mask size
    members = np.flatnonzero((sizes == size).all(axis=1))
    h, w = int(size[0]), int(size[1])
    decoded = mask_utils.decode([{"size": [h, w], "counts": rles[i]} for i in members])
    for k, i in enumerate(members):
      if not decoded[:, :, k].any():
        x1, y1, x2, y2 = (fill_boxes[i] * [w, h, w, h]).astype(np.int64)
        decoded[y1:max(y2, y1 + 1), x1:max(x1 + 1, x2), k] = 1
    out[members] = _resample(decoded, grid, canvas, content).transpose(2, 0, 1)
  return out
