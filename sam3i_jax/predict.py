"""Inference: image + text (+ optional box exemplars) -> boxes, scores and masks at the image's size.

  predictor = Predictor.from_pretrained("converted/sam3")
  result = predictor.predict("photo.jpg", "a helmet")          # result.boxes_xyxy, .scores, .masks
  result = predictor.predict("photo.jpg", "what keeps the rider's head safe", level="complex")

Command line, one image (writes the masks drawn over the image):
  python -m sam3i_jax.predict --model DIR --image photo.jpg --text "a helmet" --output out.png
  ... --level simple|complex   (a SAM3-I model: the instruction level of the text)
A folder of images (COCO results for every image and text; `--png-dir`: the drawings too):
  python -m sam3i_jax.predict --model DIR --images photos/ --text "a helmet" --text "a horse" \
      --output results.json [--png-dir overlays/] [--batch-size 8]
results.json is a COCO results list, one entry per detection: image_id (1-based, in sorted file
order), file_name (relative to the folder), category_id (1-based index of --text), text, bbox
[x, y, w, h] pixels, score, segmentation (compressed RLE at the image's size). A file that cannot
be read as an image is reported on stderr, named in the final summary and skipped.

Every image is resized to the model's square input, so whatever their sizes the image encoder is
compiled once per batch size (a folder's last batch is padded to it) and the prompt side once per
instruction level and box-count bucket; a new text, image or boxes of the same bucket never
recompile.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax import visualize
from sam3i_jax.evaluation import coco_ap
from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.sam3 import ImageFeatures
from sam3i_jax.preprocess import load_image, preprocess
from sam3i_jax.tokenizer import ClipTokenizer

BOX_BUCKET = 4  # box prompts are padded to a multiple of this, so most new prompts reuse a compilation
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
  return {k: out[k] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit")}


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
    encoded = image if isinstance(image, EncodedImage) else self.encode_image(image)
    return self._predict_encoded(encoded.features, [encoded.image.shape[:2]], text, boxes,
                                 box_labels, threshold, level)[0]

  def predict_texts(self, images: Sequence[np.ndarray], texts: Sequence[str],
                    threshold: float = 0.5, level: Level | str = Level.CONCEPT,
                    batch_size: int | None = None) -> list[list[Prediction]]:
    """Each image's predictions for each text ([image][text]) on uint8 (H, W, 3) images of any
    sizes, `batch_size` at a time (default: all at once; the last batch is padded to that size,
    so every batch runs the same programs); the images are encoded once for all texts."""
    if not len(images):
      return []
    batch_size = batch_size or len(images)
    results = []
    for start in range(0, len(images), batch_size):
      chunk = [np.asarray(i) for i in images[start:start + batch_size]]
      for array in chunk:
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
          raise ValueError(f"images must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
      pixels = np.stack([preprocess(a, self.config.img_size) for a in chunk])
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(chunk), axis=0)])
      features = _encode_image(self.model, jnp.asarray(pixels))
      sizes = [a.shape[:2] for a in chunk]
      per_text = [self._predict_encoded(features, sizes, text, None, None, threshold, level)
                  for text in texts]
      results += [list(p) for p in zip(*per_text)]
    return results

  def _predict_encoded(self, features: ImageFeatures, sizes: Sequence[tuple[int, int]], text: str,
                       boxes, box_labels, threshold: float, level: Level | str
                       ) -> list[Prediction]:
    """The predictions for the first len(sizes) images of a batch of encoded features."""
    level = parse_level(level, self.config.adapters)
    batch = features.fpn[0].shape[0]
    tokens = self.tokenizer([text], context_length=self.config.context_length)
    token_ids = np.repeat(tokens, batch, 0)
    b, l, m = (np.repeat(a, batch, 0) for a in _pad_boxes(boxes, box_labels))
    out = jax.device_get(_ground(self.model, features, jnp.asarray(token_ids), jnp.asarray(b),
                                 jnp.asarray(l), jnp.asarray(m), level=level))
    predictions = []
    for i, (h, w) in enumerate(sizes):
      kept = postprocess(out["pred_logits"][i], out["pred_boxes"][i], out["pred_masks"][i],
                         out["presence_logit"][i], (h, w), threshold=threshold,
                         presence_in_logits=self.config.joint_presence_scores)
      predictions.append(Prediction(np.asarray(kept["boxes_xyxy"], np.float32),
                                    np.asarray(kept["scores"], np.float32),
                                    np.asarray(kept["masks"], bool), (int(h), int(w))))
    return predictions


def _parse_box(text: str) -> tuple[list[float], bool]:
  """'cx,cy,w,h' or 'cx,cy,w,h:neg' (normalised)."""
  coords, _, kind = text.partition(":")
  values = [float(v) for v in coords.split(",")]
  if len(values) != 4 or kind not in ("", "pos", "neg"):
    raise argparse.ArgumentTypeError(f"box {text!r}: expected cx,cy,w,h[:pos|:neg]")
  return values, kind != "neg"


def image_files(folder: str) -> tuple[list[str], list[str]]:
  """(image files by name, other files): paths relative to `folder`, recursively, sorted."""
  images, others = [], []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      relative = os.path.relpath(os.path.join(root, name), folder)
      (images if name.lower().endswith(IMAGE_SUFFIXES) else others).append(relative)
  return images, others


def coco_results(prediction: Prediction, image_id: int, file_name: str, category_id: int,
                 text: str) -> list[dict]:
  """One prediction as COCO result entries (with file_name and text beside the COCO fields)."""
  return [{**entry, "file_name": file_name, "text": text} for entry in coco_ap.detection_results(
      prediction.scores, prediction.boxes_xyxy, prediction.masks, image_id, category_id)]


def _progress(done: int, total: int, start: float, skipped: int) -> None:
  width = 30
  filled = width * done // max(total, 1)
  rate = done / max(time.time() - start, 1e-9)
  print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {rate:.1f} images/s"
        f"{f', {skipped} skipped' if skipped else ''}", end="", file=sys.stderr, flush=True)


def predict_folder(predictor: Predictor, folder: str, texts: Sequence[str], output: str, *,
                   png_dir: str | None = None, threshold: float = 0.5,
                   level: Level | str = Level.CONCEPT, batch_size: int = 4,
                   log=print) -> dict[str, str]:
  """COCO results of every image of `folder` for every text into `output` (see the module
  docstring); returns the skipped files with why."""
  files, others = image_files(folder)
  if others:
    log(f"{len(others)} file(s) without an image suffix {IMAGE_SUFFIXES} left out: "
        f"{others[:5]}{' ...' if len(others) > 5 else ''}")
  if not files:
    raise FileNotFoundError(f"no image files in {folder}")
  results, skipped, start = [], {}, time.time()
  for first in range(0, len(files), batch_size):
    ids, names, images = [], [], []
    for image_id, name in enumerate(files[first:first + batch_size], first + 1):
      try:
        images.append(load_image(os.path.join(folder, name)))
        ids.append(image_id)
        names.append(name)
      except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on a bad file
        skipped[name] = f"{type(e).__name__}: {e}"
        print(f"\nskipped {os.path.join(folder, name)}: {skipped[name]}", file=sys.stderr)
    predictions = predictor.predict_texts(images, texts, threshold, level, batch_size)
    for image_id, name, image, per_text in zip(ids, names, images, predictions):
      for category_id, (text, prediction) in enumerate(zip(texts, per_text), 1):
        results += coco_results(prediction, image_id, name, category_id, text)
        if png_dir:
          _save_drawing(prediction.draw(image), png_dir, name, category_id)
    _progress(min(first + batch_size, len(files)), len(files), start, len(skipped))
  print(file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(results, f)
  log(f"{len(files) - len(skipped)} images x {len(texts)} text(s): {len(results)} detections "
      f"above {threshold} written to {output}" + (f"; drawings in {png_dir}" if png_dir else ""))
  if skipped:
    log(f"{len(skipped)} image(s) skipped (not readable as images):\n" + "\n".join(
        f"  {name}: {why}" for name, why in skipped.items()))
  return skipped


def _save_drawing(drawing, png_dir: str, name: str, category_id: int) -> None:
  path = os.path.join(png_dir, f"{os.path.splitext(name)[0]}.text{category_id}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  drawing.save(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="sam3i-predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="directory written by `python -m convert`")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--image", help="one image: --output is the PNG drawn")
  source.add_argument("--images", help="a folder of images (searched recursively): --output is "
                      "the COCO results JSON")
  parser.add_argument("--text", action="append", required=True,
                      help="the prompt, e.g. 'a helmet' (with --images: repeatable)")
  parser.add_argument("--box", action="append", type=_parse_box, default=[],
                      help="exemplar box cx,cy,w,h (normalised), ':neg' for a negative one; repeatable")
  parser.add_argument("--level", choices=[level.value for level in Level], default=Level.CONCEPT.value,
                      help="instruction level of --text (simple / complex: a SAM3-I model)")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"))
  parser.add_argument("--batch-size", type=int, default=4, help="with --images: images per batch")
  parser.add_argument("--png-dir", help="with --images: also draw each image's detections per "
                      "text (<name>.text<N>.png)")
  parser.add_argument("--output", required=True, help="PNG (--image) or results JSON (--images)")
  args = parser.parse_args(argv)
  if args.image and len(args.text) != 1:
    parser.error("--image takes one --text")
  if args.images and (args.box or not os.path.isdir(args.images) or args.batch_size < 1):
    parser.error("--images needs an existing folder and --batch-size >= 1, and takes no --box")

  predictor = Predictor.from_pretrained(args.model, dtype=args.dtype)
  if args.images:
    predict_folder(predictor, args.images, args.text, args.output, png_dir=args.png_dir,
                   threshold=args.threshold, level=args.level, batch_size=args.batch_size)
    return 0
  boxes = [b for b, _ in args.box] or None
  labels = [pos for _, pos in args.box] or None
  result = predictor.predict(args.image, args.text[0], boxes, labels, threshold=args.threshold,
                             level=args.level)
  result.draw(load_image(args.image)).save(args.output)
  print(f"{len(result.scores)} objects above {args.threshold}: scores "
        f"{np.round(result.scores, 3).tolist()}; wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
