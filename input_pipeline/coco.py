"""Reader of COCO instance annotations (`instances_*.json`), for fine-tuning SAM 3 on a user's own
data as SAM 3's own recipes do (Roboflow-100-VL, ODinW): the category name is the concept prompt.

  images[]:      {"id", "file_name" (relative to the image root), "width", "height"}
  annotations[]: {"id", "image_id", "category_id", "bbox" [x, y, w, h] pixels,
                  "segmentation" (polygons, RLE or uncompressed RLE), "iscrowd", "area"}
  categories[]:  {"id", "name"}

Datapoints are (image, category) pairs, each an `hmpl.Record` whose prompt (at every instruction
level; COCO has only the category name) is the name:
- a positive for every category with annotations on the image: all of them are its targets;
- negatives, categories absent from the image (no targets: the model learns to answer "none"): a
  share `negatives` of them, 0 (none) to 1 (every category, as SAM 3 evaluates by prompting all
  categories per image), chosen by a generator seeded with (seed, image id), so the same file
  gives the same datapoints on every host and run.
A datapoint's id is `image_id * (max category id + 1) + category_id`: stable whatever the share.

Bad input follows the HMPL reader's rules and report (`hmpl.InputReport`; every message names the
file and the record): a malformed or repeated image entry, an annotation of an unknown image, a
malformed or repeated category are problems; an image with a malformed annotation, or one of an
unknown category, is dropped whole (any of its datapoints, negatives included, could be wrong); a
category name that fails the text rules drops that category everywhere.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np

from input_pipeline import hmpl


def read_coco_json(json_path: str, image_root: str, *, negatives: float = 1.0, seed: int = 0,
                   bad_input: str = "error", check_images: str = "exists",
                   text_rules: hmpl.TextRules | None = hmpl.TextRules(),
                   report: hmpl.InputReport | None = None) -> list[hmpl.Record]:
  """Validated (image, category) records of one COCO instances file, sorted by image then
  category id. `check_images`, `text_rules` and `report` as in `hmpl.read_hmpl_json`."""
  if not 0.0 <= negatives <= 1.0:
    raise ValueError(f"negatives must be a share in [0, 1], got {negatives!r}")
  if check_images not in hmpl.IMAGE_CHECKS:
    raise ValueError(f"check_images must be one of {hmpl.IMAGE_CHECKS}, got {check_images!r}")
  report = report if report is not None else hmpl.InputReport(bad_input)
  data = hmpl._load_json(json_path)
  names = hmpl.category_names(data.get("categories", []), json_path, report)
  if text_rules is not None:
    texts = hmpl._TextChecker(text_rules, report)
    names = {c: name for c, name in names.items()
             if texts.keep(name, f"{json_path}: categories (id={c}) name")}
  if not names:
    raise hmpl.BadInputError(f"{json_path}: no usable categories[] entry: the category names are "
                             "the prompts")
  images = hmpl.image_entries(data["images"], json_path, report)
  anns_by_image = hmpl.annotations_by_image(data.get("annotations", []), images, json_path, report)

  id_stride = max(names) + 1
  records = []
  for image_id in sorted(images):
    i, entry = images[image_id]
    origin = f"{json_path}: images[{i}]"
    where = f"{origin} (id={image_id}, file_name={entry['file_name']!r})"
    by_category = _annotations_by_category(anns_by_image[image_id], entry, where, names, report)
    if by_category is None:
      continue
    problem = hmpl._check_image(os.path.join(image_root, entry["file_name"]), check_images)
    if problem is not None:
      report.problem(problem[0], f"{where}: {problem[1]}")
      continue
    absent = [c for c in sorted(names) if c not in by_category]
    rng = np.random.default_rng([seed, image_id])
    chosen = sorted(rng.choice(absent, round(negatives * len(absent)), replace=False).tolist())
    for category_id in sorted([*by_category, *chosen]):
      name = names[category_id]
      records.append(hmpl.Record(
          datapoint_id=image_id * id_stride + category_id, image_id=image_id,
          file_name=entry["file_name"], height=entry["height"], width=entry["width"],
          concept=(name,), simple=(name,), complex=(name,),
          **hmpl._annotation_arrays(by_category.get(category_id, [])),
          queried_category=category_id, kind=hmpl.category_kind(name),
          origin=f"{origin} x categories id={category_id}"))
  return records


def _annotations_by_category(anns: list[tuple[int, Any]], entry: dict[str, Any], where: str,
                             names: dict[int, str], report: hmpl.InputReport
                             ) -> dict[int, list] | None:
  """Category id -> the image's parsed annotations of it; None (problem reported) when one is
  malformed or of a category that cannot be prompted."""
  by_category: dict[int, list] = collections.defaultdict(list)
  for j, ann in anns:
    try:
      parsed = hmpl._parse_annotation(ann, entry["height"], entry["width"])
    except ValueError as e:
      report.problem("malformed_annotation", f"{where}: annotations[{j}] (id={ann.get('id')}): {e}")
      return None
    if parsed.category_id not in names:
      report.problem("unknown_category_id", f"{where}: annotations[{j}] (id={ann.get('id')}): "
                     f"category_id {parsed.category_id} is not a usable categories[] entry")
      return None
    by_category[parsed.category_id].append(parsed)
  return dict(by_category)
