"""Reader of ReasonSeg (Lai et al., LISA, CVPR 2024): reasoning segmentation, as its authors publish
it: per split folder (`train`, `val`, `test`) one JPEG and one JSON per image,

  <split>/<name>.jpg
  <split>/<name>.json   {"text": [strings], "is_sentence": bool,
                         "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...]}]}

One datapoint per image, an `hmpl.Record`: every `text` at the complex level (the queries ask for
what the image shows without naming it, which is what SAM3-I's complex instructions are; the
concept and simple levels hold the same strings, as the Record needs all three, but only the
complex level is what the benchmark measures). Its kind is "long" for a sentence query
(`is_sentence`) and "short" otherwise: the test split's long-query and short-query subsets.

The masks follow LISA's `get_mask_from_json`: "flag" shapes are skipped (deprecated marks), the
others are drawn largest first (so a smaller shape inside a larger one wins), "ignore" shapes with
the ignore value and every other label as target, with integer-truncated points. The one target
annotation is the target pixels; the "ignore" pixels become `Record.ignore`, which evaluation
leaves out of both the intersection and the union, as LISA's ignore label 255 does. Polygons are
filled with their outline by PIL (LISA: OpenCV's fillPoly + polylines; boundary pixels may differ).

Bad input follows the HMPL reader's rules and report (`hmpl.InputReport`; every message names the
file): an unreadable JSON, no usable text, a label other than target / ignore / flag, a polygon with
fewer than 3 points or non-numeric points, a missing or unreadable image, no target pixel. A JPEG
without a JSON is noted (not a datapoint).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from input_pipeline import hmpl

TARGET, IGNORE, SKIPPED = "target", "ignore", "flag"
LABELS = (TARGET, IGNORE, SKIPPED)
_IGNORE_VALUE = 255  # LISA's ignore label
QUERY_KINDS = {False: "short", True: "long"}
IMAGE_SUFFIX = ".jpg"


def rasterize(shapes: list[tuple[str, np.ndarray]], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(target, ignore) boolean masks of (label, (K, 2) integer points) shapes, drawn largest first."""
  height, width = size

  def draw(points: np.ndarray, value: int, canvas: Image.Image) -> None:
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=value, outline=value)

  areas = []
  for _, points in shapes:
    canvas = Image.new("L", (width, height), 0)
    draw(points, 1, canvas)
    areas.append(int(np.count_nonzero(np.asarray(canvas))))
  canvas = Image.new("L", (width, height), 0)
  for index in np.argsort(areas, kind="stable")[::-1]:
    label, points = shapes[index]
    draw(points, _IGNORE_VALUE if label == IGNORE else 1, canvas)
  mask = np.asarray(canvas)
  return mask == 1, mask == _IGNORE_VALUE


def _rle(mask: np.ndarray) -> bytes:
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def _shapes(anno: dict[str, Any], where: str, report: hmpl.InputReport
            ) -> list[tuple[str, np.ndarray]] | None:
  shapes = anno.get("shapes")
  if not isinstance(shapes, list):
    report.problem("malformed_annotation", f"{where}: no shapes list")
    return None
  kept = []
  for k, shape in enumerate(shapes):
    label = shape.get("label") if isinstance(shape, dict) else None
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(label, str) or label.lower() not in LABELS:
      report.problem("unknown_label", f"{where}: shapes[{k}] label {label!r} is not one of {LABELS}")
      return None
    if label.lower() == SKIPPED:
      continue
    try:
      array = np.asarray(points, np.float64)
    except (TypeError, ValueError):
      array = np.zeros((0,))
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 3 or not np.isfinite(array).all():
      report.problem("malformed_polygon", f"{where}: shapes[{k}] ({label}) points {points!r:.80} "
                     "are not 3 or more [x, y] pairs")
      return None
    kept.append((label.lower(), array.astype(np.int32)))  # truncated, as LISA's int32 cast
  return kept


def read_reasonseg_folder(folder: str, *, bad_input: str = "error", check_images: str = "exists",
                          text_rules: hmpl.TextRules | None = hmpl.TextRules(),
                          report: hmpl.InputReport | None = None) -> list[hmpl.Record]:
  """Validated records of one ReasonSeg split folder, sorted by file name; `file_name` is relative
  to the folder. check_images: as in `hmpl.read_hmpl_json` (the header is read in any case, for
  the size the polygons are drawn at)."""
  if check_images not in hmpl.IMAGE_CHECKS:
    raise ValueError(f"check_images must be one of {hmpl.IMAGE_CHECKS}, got {check_images!r}")
  if not os.path.isdir(folder):
    raise hmpl.BadInputError(f"{folder}: ReasonSeg split folder not found")
  report = report if report is not None else hmpl.InputReport(bad_input)
  texts = hmpl._TextChecker(text_rules, report) if text_rules is not None else None
  names = sorted(os.listdir(folder))
  annotated = {os.path.splitext(n)[0] for n in names if n.endswith(".json")}
  for name in names:
    if name.endswith(IMAGE_SUFFIX) and os.path.splitext(name)[0] not in annotated:
      report.note("image_without_annotation", f"{os.path.join(folder, name)}: no JSON beside it")
  records = []
  for datapoint_id, stem in enumerate(sorted(annotated)):
    record = _read_one(folder, stem, datapoint_id, check_images, texts, report)
    if record is not None:
      records.append(record)
  return records


def _read_one(folder: str, stem: str, datapoint_id: int, check_images: str, texts,
              report: hmpl.InputReport) -> hmpl.Record | None:
  where = os.path.join(folder, stem + ".json")
  try:
    with open(where, "rb") as f:
      anno = json.load(f)
  except (OSError, ValueError) as e:
    report.problem("malformed_annotation", f"{where}: not a readable JSON file ({e})")
    return None
  if not isinstance(anno, dict):
    report.problem("malformed_annotation", f"{where}: not a JSON object")
    return None
  strings = anno.get("text")
  strings = [strings] if isinstance(strings, str) else strings
  strings = strings if isinstance(strings, list) else []
  levels = hmpl.usable_strings(strings, [f"text[{k}]" for k in range(len(strings))], texts, where,
                               "text", report)
  if levels is None:
    return None
  if not isinstance(anno.get("is_sentence"), bool):
    report.problem("malformed_annotation", f"{where}: is_sentence {anno.get('is_sentence')!r} "
                   "is not true or false")
    return None
  shapes = _shapes(anno, where, report)
  if shapes is None:
    return None
  file_name = stem + IMAGE_SUFFIX
  image_path = os.path.join(folder, file_name)
  problem = hmpl._check_image(image_path, "exists" if check_images == "none" else check_images)
  if problem is None:
    try:
      with Image.open(image_path) as image:
        size = (image.height, image.width)
    except Exception as e:  # PIL raises many types for corrupt files
      problem = ("corrupt_image", f"image file {image_path} cannot be read ({type(e).__name__}: {e})")
  if problem is not None:
    report.problem(problem[0], f"{where}: {problem[1]}")
    return None
  target, ignore = rasterize(shapes, size)
  if not target.any():
    report.problem("empty_target", f"{where}: no target pixel (shapes: "
                   f"{[label for label, _ in shapes]})")
    return None
  rle = {"size": list(size), "counts": _rle(target)}
  return hmpl.Record(
      datapoint_id=datapoint_id, image_id=hmpl.image_id_from_file_name(file_name),
      file_name=file_name, height=size[0], width=size[1],
      concept=levels, simple=levels, complex=levels, rles=(rle["counts"],),
      rle_sizes=np.array([size], np.int32),
      boxes=np.array([mask_utils.toBbox(rle).tolist()], np.float32),
      iscrowd=np.zeros(1, np.bool_), category_ids=np.zeros(1, np.int64),
      annotation_ids=np.array([datapoint_id], np.int64),
      kind=QUERY_KINDS[anno["is_sentence"]], origin=where,
      ignore=_rle(ignore) if ignore.any() else b"")
