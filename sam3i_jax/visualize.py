"""Detections drawn over an image (the CLI's output, the notebook, evaluation's PNG overlays)."""

from __future__ import annotations

import numpy as np


def draw(image: np.ndarray, boxes_xyxy: np.ndarray, scores: np.ndarray, masks: np.ndarray,
         alpha: float = 0.5):
  """The masks (K, H, W) (one colour each), boxes (K, 4) in pixels and scores (K,) drawn over the
  uint8 (H, W, 3) `image`; returns a PIL image."""
  from PIL import Image, ImageDraw

  canvas = image.astype(np.float32).copy()
  rng = np.random.default_rng(0)
  colours = rng.integers(64, 256, size=(len(scores), 3))
  for mask, colour in zip(masks, colours):
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
  picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
  pen = ImageDraw.Draw(picture)
  for box, score, colour in zip(boxes_xyxy, scores, colours):
    pen.rectangle([float(v) for v in box], outline=tuple(int(c) for c in colour), width=3)
    pen.text((float(box[0]) + 4, float(box[1]) + 2), f"{score:.2f}", fill=tuple(int(c) for c in colour))
  return picture
