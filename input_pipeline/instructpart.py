"""Reader of InstructPart (Wan et al., ACL 2025; dataset card "zifuwan/InstructPart"): task-oriented
part segmentation, as its authors publish it.

  <split>/data_<...>.json   a list of {"image_path", "part_list": [{"object", "part",
                            "affordance", "action", "instruction": [6 strings]}]}
  <split>/images/           the images (`image_path`'s file name)
  <split>/masks/            one 8-bit PNG per (image, object, part), values {0, 1}, named
                            `<image stem>-<object>-<part>.png` with spaces as "_"

(splits: `test` (600 samples), `train/train{200,600,1200,1800}` (nested subsets), `all`.)
The six instructions are, in order: the human task instruction, its GPT-4 rewrite, a
part-of-object sentence, a part-of-object-affordance sentence, the part-of-object name, the
part-of-object-affordance name.

One datapoint per (image, part entry), an `hmpl.Record` whose one target is the part's mask
(kind "part"). Its prompts on our three levels, and why:
- concept = the part-of-object name (instruction 5, e.g. "mug handle"): a noun phrase, what SAM 3's
  concept prompts are; evaluated at this level it is the paper's ORPS setting (oracle referring
  part segmentation: the part is named);
- simple = the part-of-object sentence and the part-of-object-affordance sentence (3, 4): they
  name the target, as SAM3-I's simple instructions do;
- complex = the task instruction and its rewrite (1, 2): they name the task, not the part, which is
  what SAM3-I's complex instructions are; at this level it is the paper's TRPS setting
  (task reasoning part segmentation).
Records hold every string of a level; evaluation reads the first of the simple and complex levels
(the part-of-object sentence; the human task instruction) and one sample per concept string with
`expand_concepts`.

Bad input follows the HMPL reader's rules and report (`hmpl.InputReport`; every message names the
file and the record, `path: [i] (image_path=...) part_list[k] (object=..., part=...)`): a malformed
entry or part entry (an instruction list that is not 6 strings among them), a missing or unreadable
mask, a mask whose size differs from its image's or with values other than 0 and 1, an empty mask,
a missing image. A bad part entry drops that datapoint only; a bad image drops all of its entries.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from input_pipeline import hmpl

NUM_INSTRUCTIONS = 6
# Indices into an entry's `instruction` list, per level (see the module docstring).
LEVEL_INSTRUCTIONS = {"concept": (4,), "simple": (2, 3), "complex": (0, 1)}
PART_FIELDS = ("object", "part", "instruction")
TARGET_KIND = "part"


def mask_file_name(image_path: str, obj: str, part: str) -> str:
  """The mask PNG of (image, object, part): `<image stem>-<object>-<part>.png`, spaces as "_"."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return f"{stem}-{obj}-{part}.png".replace(" ", "_")


def _load_list(path: str) -> list[Any]:
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise hmpl.BadInputError(f"{path}: annotation file not found") from e
  except (OSError, ValueError) as e:
    raise hmpl.BadInputError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(data, list):
    raise hmpl.BadInputError(f"{path}: expected a JSON list of image entries")
  return data


def _image_size(path: str) -> tuple[int, int] | str:
  """(height, width) from the image header, or why it cannot be read."""
  if not os.path.isfile(path):
    return f"image file {path} not found"
  try:
    with Image.open(path) as image:
      return image.height, image.width
  except Exception as e:  # PIL raises many types for corrupt files
    return f"image file {path} cannot be read ({type(e).__name__}: {e})"


def _mask_rle(path: str, size: tuple[int, int]) -> tuple[bytes, list[float]] | tuple[str, str]:
  """(compressed RLE counts, [x, y, w, h]) of a {0, 1} mask PNG of `size`, or (problem, message)."""
  if not os.path.isfile(path):
    return "missing_mask", f"mask file {path} not found"
  try:
    with Image.open(path) as image:
      mask = np.asarray(image)
  except Exception as e:
    return "corrupt_mask", f"mask file {path} cannot be decoded ({type(e).__name__}: {e})"
  if mask.shape[:2] != size or mask.ndim != 2:
    return "mask_size_differs", (f"mask file {path} is {mask.shape} where its image is {size} "
                                 "(height, width; one channel)")
  values = np.unique(mask)
  if not set(values.tolist()) <= {0, 1}:
    return "bad_mask_values", f"mask file {path} holds values {values[:8].tolist()}, not 0 and 1"
  if not values.any():
    return "empty_mask", f"mask file {path} marks no pixel"
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return rle["counts"], mask_utils.toBbox(rle).tolist()


def read_instructpart_json(json_path: str, image_root: str | None = None, *,
                           mask_root: str | None = None, bad_input: str = "error",
                           check_images: str = "exists",
                           text_rules: hmpl.TextRules | None = hmpl.TextRules(),
                           report: hmpl.InputReport | None = None) -> list[hmpl.Record]:
  """Validated records of one InstructPart data JSON, in file order (entry, then part).

  image_root / mask_root: the folders of the images and masks (default: `images/` and `masks/`
  beside the JSON). check_images: as in `hmpl.read_hmpl_json`; the image's header is read in any
  case, for its size. Datapoint ids are the datapoints' positions in the file.
  """
  if check_images not in hmpl.IMAGE_CHECKS:
    raise ValueError(f"check_images must be one of {hmpl.IMAGE_CHECKS}, got {check_images!r}")
  folder = os.path.dirname(os.path.abspath(json_path))
  image_root = image_root or os.path.join(folder, "images")
  mask_root = mask_root or os.path.join(folder, "masks")
  report = report if report is not None else hmpl.InputReport(bad_input)
  texts = hmpl._TextChecker(text_rules, report) if text_rules is not None else None
  records: list[hmpl.Record] = []
  position = 0
  for i, entry in enumerate(_load_list(json_path)):
    image_path = entry.get("image_path") if isinstance(entry, dict) else None
    parts = entry.get("part_list") if isinstance(entry, dict) else None
    where = f"{json_path}: [{i}] (image_path={image_path!r})"
    if not isinstance(image_path, str) or not image_path or not isinstance(parts, list):
      report.problem("malformed_image_entry", f"{where}: needs image_path and a part_list list")
      continue
    file_name = os.path.basename(image_path)
    size = _image_size(os.path.join(image_root, file_name))
    problem = (("missing_image", size) if isinstance(size, str)
               else hmpl._check_image(os.path.join(image_root, file_name), check_images))
    if problem is not None:
      report.problem(problem[0], f"{where}: {problem[1]}")
      position += len(parts)
      continue
    for k, part in enumerate(parts):
      record = _part_record(part, f"{where} part_list[{k}]", file_name, size, mask_root,
                            texts, report, position, origin=f"{json_path}: [{i}] part_list[{k}]")
      position += 1
      if record is not None:
        records.append(record)
  return records


def _part_record(part: Any, where: str, file_name: str, size: tuple[int, int], mask_root: str,
                 texts, report: hmpl.InputReport, datapoint_id: int,
                 origin: str) -> hmpl.Record | None:
  if not isinstance(part, dict) or not all(isinstance(part.get(f), str if f != "instruction"
                                                      else list) for f in PART_FIELDS):
    report.problem("malformed_part_entry", f"{where}: needs object and part strings and an "
                   "instruction list")
    return None
  where = f"{where} (object={part['object']!r}, part={part['part']!r})"
  instructions = part["instruction"]
  if len(instructions) != NUM_INSTRUCTIONS:
    report.problem("malformed_part_entry", f"{where}: instruction holds {len(instructions)} "
                   f"strings, not {NUM_INSTRUCTIONS}")
    return None
  levels = {}
  for level, indices in LEVEL_INSTRUCTIONS.items():
    levels[level] = hmpl.usable_strings([instructions[j] for j in indices],
                                        [f"instruction[{j}]" for j in indices], texts, where,
                                        f"the {level} instructions {list(indices)}", report)
    if levels[level] is None:
      return None
  mask = _mask_rle(os.path.join(mask_root, mask_file_name(file_name, part["object"],
                                                          part["part"])), size)
  if isinstance(mask[0], str):
    report.problem(mask[0], f"{where}: {mask[1]}")
    return None
  rle, box = mask
  return hmpl.Record(
      datapoint_id=datapoint_id, image_id=hmpl.image_id_from_file_name(file_name),
      file_name=file_name, height=size[0], width=size[1], **levels,
      rles=(rle,), rle_sizes=np.array([size], np.int32), boxes=np.array([box], np.float32),
      iscrowd=np.zeros(1, np.bool_), category_ids=np.zeros(1, np.int64),
      annotation_ids=np.array([datapoint_id], np.int64), kind=TARGET_KIND, origin=origin)
