"""Inference: image + text (+ optional box exemplars) -> boxes, scores and masks at the image's size.

  predictor = Predictor.from_pretrained("converted/sam3")
  result = predictor.predict("photo.jpg", "a helmet")          # result.boxes_xyxy, .scores, .masks
  result = predictor.predict("photo.jpg", "what keeps the rider's head safe", level="complex")

Command line (writes the masks drawn over the image):
  python -m sam3i_jax.predict --model DIR --image photo.jpg --text "a helmet" --output out.png
  ... --level simple|complex   (a SAM3-I model: the instruction level of the text)

The image encoder is compiled once; the prompt side once per instruction level and box-count bucket.
A new text or new boxes of the same bucket never recompile.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax import visualize
from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.sam3 import ImageFeatures
from sam3i_jax.preprocess import load_image, preprocess
from sam3i_jax.tokenizer import ClipTokenizer

BOX_BUCKET = 4  # box prompts are padded to a multiple of this, so most new prompts reuse a compilation


@dataclasses.dataclass
class Prediction:
  boxes_xyxy: np.ndarray  # (K, 4) float32, pixels of the original image
  scores: np.ndarray  # (K,) float32, sigmoid(logit) * sigmoid(presence) (SAM 3.1: in the logit)
  masks: np.ndarray  # (K, H, W) bool
  image_size: tuple[int, int]  # (H, W)

  def draw(self, image: np.ndarray, alpha: float = 0.5):
    """This prediction over `image` (uint8 (H, W, 3)): masks, boxes and scores; a PIL image."""
    return visualize.draw(image, self.boxes_xyxy, self.scores, self.masks, alpha)


@dataclasses.dataclass
class EncodedImage:
  features: ImageFeatures
  image: np.ndarray  # the original uint8 (H, W, 3)


@nnx.jit
def _encode_image(model, images):
  return model.encode_image(images)


@functools.partial(nnx.jit, static_argnames="level")
def _ground(model, features, token_ids, boxes, box_labels, box_mask, level):
  out = model.ground(features, model.encode_text(token_ids, level), boxes, box_labels, box_mask,
                     level=level)
  return {k: out[k][0] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit")}


def _pad_boxes(boxes, labels):
  boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = (np.ones(len(boxes), bool) if labels is None else np.asarray(labels, bool).reshape(-1))
  if len(labels) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
  if len(boxes) and ((boxes[:, 2:] <= 0).any() or (boxes < -1).any() or (boxes > 2).any()):
    raise ValueError("boxes must be normalised cx, cy, w, h (fractions of the image) with w, h > 0")
  n = -(-len(boxes) // BOX_BUCKET) * BOX_BUCKET
  pad = n - len(boxes)
  mask = np.concatenate([np.zeros(len(boxes), bool), np.ones(pad, bool)])
  boxes = np.concatenate([boxes, np.tile([[0.5, 0.5, 1.0, 1.0]], (pad, 1)).astype(np.float32)])
  labels = np.concatenate([labels, np.zeros(pad, bool)])
  return boxes[None], labels[None], mask[None]


class Predictor:
  """A SAM 3 / SAM3-I model with its tokenizer, ready for single-image inference."""

  def __init__(self, model, tokenizer: ClipTokenizer):
    self.model = model
    self.model.eval()
    self.tokenizer = tokenizer
    self.config = model.config

  @classmethod
  def from_pretrained(cls, directory: str, *, dtype: str | None = None) -> "Predictor":
    from sam3i_jax.pretrained import load_pretrained
    return cls(load_pretrained(directory, dtype=dtype), ClipTokenizer(extra_dirs=[directory]))

  def encode_image(self, image) -> EncodedImage:
    """image: a file path or a uint8 (H, W, 3) array."""
    array = load_image(image) if isinstance(image, str) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
      raise ValueError(f"image must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    pixels = preprocess(array, self.config.img_size)[None]
    return EncodedImage(_encode_image(self.model, jnp.asarray(pixels)), array)

  def predict(self, image, text: str, boxes: Sequence | None = None, box_labels: Sequence | None = None,
              threshold: float = 0.5, level: Level | str = Level.CONCEPT) -> Prediction:
    """image: path, uint8 array or an EncodedImage (to reuse the image side across prompts).
    boxes: (N, 4) normalised cx, cy, w, h; box_labels: (N,) True = positive exemplar.
    level: the text's instruction level (simple / complex need a SAM3-I model)."""
    level = parse_level(level, self.config.adapters)
    encoded = image if isinstance(image, EncodedImage) else self.encode_image(image)
    token_ids = self.tokenizer([text], context_length=self.config.context_length)
    b, l, m = _pad_boxes(boxes, box_labels)
    out = _ground(self.model, encoded.features, jnp.asarray(token_ids), jnp.asarray(b), jnp.asarray(l),
                  jnp.asarray(m), level=level)
    out = jax.device_get(out)
    h, w = encoded.image.shape[:2]
    kept = postprocess(out["pred_logits"], out["pred_boxes"], out["pred_masks"], out["presence_logit"],
                       (h, w), threshold=threshold,
                       presence_in_logits=self.config.joint_presence_scores)
    return Prediction(np.asarray(kept["boxes_xyxy"], np.float32), np.asarray(kept["scores"], np.float32),
                      np.asarray(kept["masks"], bool), (h, w))


def _parse_box(text: str) -> tuple[list[float], bool]:
  """'cx,cy,w,h' or 'cx,cy,w,h:neg' (normalised)."""
  coords, _, kind = text.partition(":")
  values = [float(v) for v in coords.split(",")]
  if len(values) != 4 or kind not in ("", "pos", "neg"):
    raise argparse.ArgumentTypeError(f"box {text!r}: expected cx,cy,w,h[:pos|:neg]")
  return values, kind != "neg"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="sam3i-predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="directory written by `python -m convert`")
  parser.add_argument("--image", required=True)
  parser.add_argument("--text", required=True, help="the prompt, e.g. 'a helmet'")
  parser.add_argument("--box", action="append", type=_parse_box, default=[],
                      help="exemplar box cx,cy,w,h (normalised), ':neg' for a negative one; repeatable")
  parser.add_argument("--level", choices=[level.value for level in Level], default=Level.CONCEPT.value,
                      help="instruction level of --text (simple / complex: a SAM3-I model)")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"))
  parser.add_argument("--output", required=True, help="PNG to write")
  args = parser.parse_args(argv)

  predictor = Predictor.from_pretrained(args.model, dtype=args.dtype)
  boxes = [b for b, _ in args.box] or None
  labels = [pos for _, pos in args.box] or None
  result = predictor.predict(args.image, args.text, boxes, labels, threshold=args.threshold,
                             level=args.level)
  result.draw(load_image(args.image)).save(args.output)
  print(f"{len(result.scores)} objects above {args.threshold}: scores "
        f"{np.round(result.scores, 3).tolist()}; wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
