"""Reader of the HMPL-Instruct JSON format: one validated `Record` per `images[]` entry.

The format (COCO-style; also used by the RefCOCO/+/g, gRefCOCO, Ref-ZOM, ReasonSeg and MMR
conversions of SAM3-I's mixture):

  images[]:      {"id", "file_name" (relative to the image root), "width", "height",
                  "text_inst_input": {"concept": [...], "simple_query": [...],
                                      "complex_query": [...]}, "queried_category" (optional)}
  annotations[]: {"id", "image_id" (= an images[] id), "category_id", "bbox" [x, y, w, h] pixels,
                  "segmentation" (RLE, uncompressed RLE or polygons), "iscrowd", "area"}
  categories[]:  {"id", "name"} (optional: only the target kind below needs it)

One images[] entry is one datapoint (image + instruction set) and ALL its annotations are its
targets (one for 1to1, several for 1toN, every instance for 1toAll, none for a negative); the same
file_name may appear in several entries. Records come sorted by id, as in the reference loader.

Target kind ("object" or "part", for the paper's object / part breakdown): SAM3-I's released code
has no such split (its `scripts/evaluate.py` groups by nothing but the file it is given), so the
rule is ours, taken from the naming of PACO-LVIS, which HMPL-Instruct is built on: PACO's 75
object categories carry LVIS names ("mug", id 708) and its 456 part categories are named
"object:part" ("mug:handle", id 2182); a ":" in the name holds exactly for PACO's
supercategory "PART". A datapoint's kind is that of the category it queries (`queried_category`),
else that of its annotations' categories when they all have one kind; a negative (no
annotations) thus takes its queried category's kind. The kind is "" (unknown) when the file has
no `categories[]`, the category ids are not in it, or the annotations mix both kinds (noted in
the report when the file lists categories).

Bad input: every problem names the file and the record (`path: images[i] (id=..., file_name=...)`,
`path: annotations[j] (id=..., image_id=...)` or `path: categories[k] (id=..., name=...)`). With
`bad_input="error"` the first problem raises `BadInputError`; with `"skip"` the record is
dropped and the problem is counted in the `InputReport`. An annotation whose image id does not
exist is dropped alone (it belongs to no record); so is a malformed category entry (datapoints of
that category get an unknown kind) or a repeated category id (the first entry counts). A record
with any malformed annotation is dropped whole: training on part of a datapoint's targets would
teach the model to leave the others out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import zlib
from typing import Any, Iterable, NamedTuple

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from input_pipeline import masks as masks_lib

BAD_INPUT_POLICIES = ("error", "skip")
IMAGE_CHECKS = ("none", "exists", "decode")
LEVELS = ("concept", "simple", "complex")
PART_SEPARATOR = ":"  # PACO names part categories "object:part"
JSON_LEVEL_KEYS = {"concept": "concept", "simple": "simple_query", "complex": "complex_query"}
_EXAMPLES_KEPT = 5  # messages kept per problem kind in a report

logger = logging.getLogger(__name__)


class BadInputError(ValueError):
  """Input data that cannot be used, with the file and record it comes from."""


@dataclasses.dataclass
class Record:
  """One datapoint: an image, its instructions per level and all its target annotations.

  Annotation arrays have one row per annotation, in file order. `rles` are compressed COCO RLE
  counts with their (h, w) in `rle_sizes`; `boxes` are the annotations' [x, y, w, h] in pixels of
  the (height, width) image that the JSON states. `image` is the encoded image file, filled by
  the source that reads it (`image_error` says why it could not be read).
  """

  datapoint_id: int
  image_id: int
  file_name: str
  height: int
  width: int
  concept: tuple[str, ...]
  simple: tuple[str, ...]
  complex: tuple[str, ...]
  rles: tuple[bytes, ...]
  rle_sizes: np.ndarray  # (N, 2) int32
  boxes: np.ndarray  # (N, 4) float32
  iscrowd: np.ndarray  # (N,) bool
  category_ids: np.ndarray  # (N,) int64
  annotation_ids: np.ndarray  # (N,) int64
  queried_category: int = -1
  kind: str = ""  # "object", "part" or "" (unknown): see the module docstring
  origin: str = ""  # "path: images[i]" for messages
  # Compressed COCO RLE counts at (height, width) of the pixels that count in neither the
  # intersection nor the union of the IoU (ReasonSeg's "ignore" regions, as LISA evaluates
  # them); b"" = none.
  ignore: bytes = b""
  image: bytes | None = None
  image_error: str | None = None

  def instructions(self, level: str) -> tuple[str, ...]:
    return getattr(self, level)

  def to_features(self) -> dict[str, Any]:
    """The record (with its image bytes) as plain values for the TFDS features."""
    if self.image is None:
      raise ValueError(f"{self.origin}: no image bytes to store")
    return {
        "datapoint_id": self.datapoint_id, "image_id": self.image_id,
        "file_name": self.file_name, "height": self.height, "width": self.width,
        "concept": list(self.concept), "simple": list(self.simple),
        "complex": list(self.complex), "rles": [r.decode("ascii") for r in self.rles],
        "rle_sizes": self.rle_sizes, "boxes": self.boxes, "iscrowd": self.iscrowd,
        "category_ids": self.category_ids, "annotation_ids": self.annotation_ids,
        "queried_category": self.queried_category, "kind": self.kind, "origin": self.origin,
        "ignore": self.ignore.decode("ascii"), "image": self.image,
    }

  @classmethod
  def from_features(cls, features: dict[str, Any]) -> "Record":
    """Inverse of `to_features` for what a TFDS data source returns (text as bytes)."""
    return cls(
        datapoint_id=int(features["datapoint_id"]), image_id=int(features["image_id"]),
        file_name=_as_text(features["file_name"]), height=int(features["height"]),
        width=int(features["width"]),
        **{level: tuple(_as_text(s) for s in features[level]) for level in LEVELS},
        rles=tuple(r if isinstance(r, bytes) else r.encode("ascii") for r in features["rles"]),
        rle_sizes=np.asarray(features["rle_sizes"], np.int32).reshape(-1, 2),
        boxes=np.asarray(features["boxes"], np.float32).reshape(-1, 4),
        iscrowd=np.asarray(features["iscrowd"], np.bool_).reshape(-1),
        category_ids=np.asarray(features["category_ids"], np.int64).reshape(-1),
        annotation_ids=np.asarray(features["annotation_ids"], np.int64).reshape(-1),
        queried_category=int(features["queried_category"]),
        kind=_as_text(features.get("kind", "")),  # shards of builder 1.0.0 have no kind
        origin=_as_text(features["origin"]),
        ignore=_as_text(features.get("ignore", "")).encode("ascii"),  # none before builder 1.2.0
        image=bytes(features["image"]))


def _as_text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def image_id_from_file_name(file_name: str) -> int:
  """The COCO image id in a file name (`train2017/000000123456.jpg` -> 123456), else a hash."""
  stem = os.path.splitext(os.path.basename(file_name))[0]
  if stem.isdigit():
    return int(stem)
  return zlib.crc32(file_name.encode("utf-8")) & 0x7FFFFFFF


class InputReport:
  """Counts of problems (records or annotations dropped) and notes (kept, but worth knowing)."""

  def __init__(self, bad_input: str = "error"):
    if bad_input not in BAD_INPUT_POLICIES:
      raise ValueError(f"bad_input must be one of {BAD_INPUT_POLICIES}, got {bad_input!r}")
    self.bad_input = bad_input
    self.problems: collections.Counter[str] = collections.Counter()
    self.notes: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def problem(self, kind: str, message: str) -> None:
    """Raises under the "error" policy; otherwise counts the problem (the caller skips)."""
    if self.bad_input == "error":
      raise BadInputError(f"{message} [{kind}]")
    self.problems[kind] += 1
    self._keep(kind, message)
    if self.problems[kind] <= _EXAMPLES_KEPT:
      logger.warning("skipped: %s [%s]", message, kind)

  def note(self, kind: str, message: str) -> None:
    self.notes[kind] += 1
    self._keep(kind, message)

  def _keep(self, kind: str, message: str) -> None:
    if len(self.examples[kind]) < _EXAMPLES_KEPT:
      self.examples[kind].append(message)

  def merge(self, other: "InputReport") -> None:
    self.problems.update(other.problems)
    self.notes.update(other.notes)
    for kind, messages in other.examples.items():
      room = _EXAMPLES_KEPT - len(self.examples[kind])
      self.examples[kind].extend(messages[:max(room, 0)])

  def to_dict(self) -> dict[str, Any]:
    return {"bad_input": self.bad_input, "problems": dict(self.problems),
            "notes": dict(self.notes), "examples": dict(self.examples)}

  def __str__(self) -> str:
    parts = [f"{k}={v}" for k, v in sorted(self.problems.items())]
    notes = [f"{k}={v}" for k, v in sorted(self.notes.items())]
    return (f"skipped: {', '.join(parts) or 'nothing'}; notes: {', '.join(notes) or 'none'}")


@dataclasses.dataclass(frozen=True)
class TextRules:
  """What counts as a bad instruction string.

  overlong: a string longer than `context_length` tokens (SOT and EOT included) is "truncate"d by
    the tokenizer, as in the reference (counted as a note), or "invalid".
  non_ascii: a string that is not ASCII after the tokenizer's cleaning (ftfy, HTML unescape) is
    "keep"-t (counted as a note; CLIP's byte-level BPE encodes it) or "invalid".
  An invalid string is a problem: an error, or dropped from its list under bad_input="skip".
  """

  context_length: int = 32
  overlong: str = "truncate"
  non_ascii: str = "keep"
  vocab_path: str | None = None

  def __post_init__(self):
    if self.overlong not in ("truncate", "invalid"):
      raise ValueError(f"overlong must be 'truncate' or 'invalid', got {self.overlong!r}")
    if self.non_ascii not in ("keep", "invalid"):
      raise ValueError(f"non_ascii must be 'keep' or 'invalid', got {self.non_ascii!r}")


class _TextChecker:
  """Applies `TextRules` to one instruction string (the tokenizer is loaded once)."""

  def __init__(self, rules: TextRules, report: InputReport):
    from sam3i_jax import tokenizer as tokenizer_lib  # numpy-only; loads the BPE vocabulary
    self.rules, self.report = rules, report
    self.clean_text = tokenizer_lib.clean_text
    self.tokenizer = tokenizer_lib.ClipTokenizer(rules.vocab_path)

  def keep(self, text: Any, where: str) -> bool:
    if not isinstance(text, str) or not text.strip():
      self.report.problem("empty_instruction", f"{where}: {text!r} is not a non-empty string")
      return False
    if not self.clean_text(text).isascii():
      if self.rules.non_ascii == "invalid":
        self.report.problem("non_ascii_instruction", f"{where}: {text!r} is not ASCII")
        return False
      self.report.note("non_ascii_instruction", f"{where}: {text!r}")
    tokens = len(self.tokenizer.encode(text)) + 2
    if tokens > self.rules.context_length:
      message = f"{where}: {text!r} has {tokens} tokens > {self.rules.context_length}"
      if self.rules.overlong == "invalid":
        self.report.problem("overlong_instruction", message)
        return False
      self.report.note("truncated_instruction", message)
    return True


def usable_strings(strings: list[Any], labels: list[str], texts: _TextChecker | None, where: str,
                   name: str, report: InputReport) -> tuple[str, ...] | None:
  """The strings of one instruction list that `texts` keeps (each named `where: labels[k]`;
  without text rules, an empty or non-string entry is a problem), or None, the problem reported,
  when none is left (`name` says which list)."""
  if texts is not None:
    kept = [s for s, label in zip(strings, labels) if texts.keep(s, f"{where}: {label}")]
  elif all(isinstance(s, str) and s.strip() for s in strings):
    kept = list(strings)
  else:
    report.problem("empty_instruction", f"{where}: {name} holds an empty or non-string entry")
    return None
  if not kept:
    report.problem("empty_instructions", f"{where}: {name} is missing or empty")
    return None
  return tuple(kept)


def _positive_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _int_id(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _load_json(path: str) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise BadInputError(f"{path}: annotation file not found") from e
  except (OSError, ValueError) as e:
    raise BadInputError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise BadInputError(f"{path}: expected a JSON object with an 'images' list")
  for key in ("annotations", "categories"):
    if not isinstance(data.get(key, []), list):
      raise BadInputError(f"{path}: '{key}' is not a list")
  return data


def category_kind(name: str) -> str:
  """The target kind that a category name stands for: "part" for PACO's "object:part" names."""
  return "part" if PART_SEPARATOR in name else "object"


def category_names(categories: list[Any], json_path: str,
                   report: InputReport) -> dict[int, str]:
  """Category id -> name; a malformed or repeated entry is a problem (dropped on skip)."""
  index_of: dict[int, int] = {}
  names: dict[int, str] = {}
  for k, category in enumerate(categories):
    category_id = category.get("id") if isinstance(category, dict) else None
    name = category.get("name") if isinstance(category, dict) else None
    where = f"{json_path}: categories[{k}] (id={category_id!r}, name={name!r})"
    if not _int_id(category_id) or not isinstance(name, str) or not name.strip():
      report.problem("malformed_category", f"{where}: needs an integer id and a non-empty name")
      continue
    if category_id in index_of:
      report.problem("duplicate_category_id",
                     f"{where}: id already used by categories[{index_of[category_id]}]")
      continue
    index_of[category_id] = k
    names[category_id] = name
  return names


def _target_kind(queried: int, category_ids: Iterable[int], kinds: dict[int, str]) -> str:
  """The queried category's kind, else the one kind of all annotations, else ""."""
  if queried in kinds:
    return kinds[queried]
  found = {kinds.get(c, "") for c in category_ids}
  return found.pop() if len(found) == 1 else ""


def _check_image(path: str, mode: str) -> tuple[str, str] | None:
  """(problem kind, message) if the image file cannot be used, else None."""
  if mode == "none":
    return None
  if not os.path.isfile(path):
    return "missing_image", f"image file {path} not found"
  if mode == "decode":
    try:
      with Image.open(path) as image:
        image.load()
    except Exception as e:  # PIL raises many types for corrupt files
      return "corrupt_image", f"image file {path} cannot be decoded ({type(e).__name__}: {e})"
  return None


class _Annotation(NamedTuple):
  rle: bytes
  size: tuple[int, int]
  box: list[float]
  iscrowd: bool
  category_id: int
  annotation_id: int


def _annotation_arrays(anns: list[_Annotation]) -> dict[str, Any]:
  return {
      "rles": tuple(a.rle for a in anns),
      "rle_sizes": np.array([a.size for a in anns], np.int32).reshape(-1, 2),
      "boxes": np.array([a.box for a in anns], np.float32).reshape(-1, 4),
      "iscrowd": np.array([a.iscrowd for a in anns], np.bool_),
      "category_ids": np.array([a.category_id for a in anns], np.int64),
      "annotation_ids": np.array([a.annotation_id for a in anns], np.int64),
  }


def _parse_annotation(ann: dict[str, Any], height: int, width: int) -> _Annotation:
  """One annotation, validated; ValueError saying what is malformed."""
  if "segmentation" not in ann or ann["segmentation"] in (None, [], {}):
    raise ValueError("no segmentation")
  try:
    rle, size = masks_lib.to_compressed_rle(ann["segmentation"], height, width)
  except masks_lib.SegmentationError as e:
    raise ValueError(f"malformed segmentation: {e}") from e
  box = ann.get("bbox")
  if box is None:  # the mask's own box
    box = mask_utils.toBbox({"size": list(size), "counts": rle}).tolist()
  if (not isinstance(box, list) or len(box) != 4
      or not all(masks_lib.is_finite_number(v) for v in box) or box[2] < 0 or box[3] < 0):
    raise ValueError(f"bbox {box!r} is not [x, y, w, h] with w, h >= 0")
  iscrowd = ann.get("iscrowd", 0)
  if iscrowd not in (0, 1):  # True and False compare equal to 1 and 0
    raise ValueError(f"iscrowd {iscrowd!r} is not 0 or 1")
  category = ann.get("category_id", -1)
  if not _int_id(category):
    raise ValueError(f"category_id {category!r} is not an integer")
  return _Annotation(rle, size, [float(v) for v in box], bool(iscrowd), category,
                     int(ann.get("id", -1)))


def read_hmpl_json(json_path: str, image_root: str, *, bad_input: str = "error",
                   check_images: str = "exists", text_rules: TextRules | None = TextRules(),
                   report: InputReport | None = None) -> list[Record]:
  """Validated records (without image bytes) of one HMPL-format JSON file, sorted by id.

  check_images: "exists" (stat each file), "decode" (decode each file: slow, catches corrupt
  files up front), "none". text_rules=None skips the instruction checks (they load the CLIP
  vocabulary). Problems go to `report` (a new one under `bad_input` if not given).
  """
  if check_images not in IMAGE_CHECKS:
    raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
  report = report if report is not None else InputReport(bad_input)
  texts = _TextChecker(text_rules, report) if text_rules is not None else None
  data = _load_json(json_path)
  kinds = ({i: category_kind(name) for i, name in
            category_names(data["categories"], json_path, report).items()}
           if data.get("categories") else None)
  entries = image_entries(data["images"], json_path, report)
  anns_by_image = annotations_by_image(data.get("annotations", []), entries, json_path, report)
  records = []
  for datapoint_id in sorted(entries):
    i, entry = entries[datapoint_id]
    origin = f"{json_path}: images[{i}]"
    record = _parse_entry(entry, anns_by_image[datapoint_id], origin, image_root, check_images,
                          texts, kinds, report)
    if record is not None:
      records.append(record)
  return records


def image_entries(entries: list[Any], json_path: str,
                  report: InputReport) -> dict[int, tuple[int, dict[str, Any]]]:
  """Image id -> (index in images[], entry) of the well-formed images[] entries; a malformed or
  repeated one is a problem (dropped on skip)."""
  images: dict[int, tuple[int, dict[str, Any]]] = {}
  for i, entry in enumerate(entries):
    where = f"{json_path}: images[{i}]"
    if not isinstance(entry, dict) or not _int_id(entry.get("id")):
      report.problem("malformed_image_entry", f"{where}: no integer 'id'")
      continue
    where = f"{where} (id={entry['id']}, file_name={entry.get('file_name')!r})"
    if entry["id"] in images:
      report.problem("duplicate_image_id", f"{where}: id already used by images"
                     f"[{images[entry['id']][0]}]")
      continue
    if (not isinstance(entry.get("file_name"), str) or not _positive_int(entry.get("width"))
        or not _positive_int(entry.get("height"))):
      report.problem("malformed_image_entry", f"{where}: needs file_name, width and height")
      continue
    images[entry["id"]] = (i, entry)
  return images


def annotations_by_image(annotations: list[Any], images: dict[int, Any], json_path: str,
                         report: InputReport) -> dict[int, list[tuple[int, Any]]]:
  """Image id -> [(index in annotations[], annotation)]; one of an unknown image is a problem."""
  by_image: dict[int, list[tuple[int, Any]]] = collections.defaultdict(list)
  for j, ann in enumerate(annotations):
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    if image_id not in images:
      ann_id = ann.get("id") if isinstance(ann, dict) else None
      report.problem("unknown_image_id", f"{json_path}: annotations[{j}] (id={ann_id}, "
                     f"image_id={image_id}): no images[] entry has this id")
      continue
    by_image[image_id].append((j, ann))
  return by_image


def _parse_entry(entry: dict[str, Any], anns: Iterable[tuple[int, Any]], origin: str,
                 image_root: str, check_images: str, texts: _TextChecker | None,
                 kinds: dict[int, str] | None, report: InputReport) -> Record | None:
  """The record of one images[] entry, or None (problem reported) if it must be skipped.

  kinds: category id -> target kind; None when the file has no categories[] (kind unknown).
  """
  where = f"{origin} (id={entry['id']}, file_name={entry['file_name']!r})"
  inst = entry.get("text_inst_input")
  if not isinstance(inst, dict):
    report.problem("empty_instructions", f"{where}: no text_inst_input object")
    return None
  levels = {}
  for level, key in JSON_LEVEL_KEYS.items():
    strings = inst.get(key) if isinstance(inst.get(key), list) else []
    levels[level] = usable_strings(strings, [f"{key}[{k}]" for k in range(len(strings))], texts,
                                   where, f"text_inst_input.{key}", report)
    if levels[level] is None:
      return None

  parsed = []
  height, width = entry["height"], entry["width"]
  for j, ann in anns:
    try:
      parsed.append(_parse_annotation(ann, height, width))
    except ValueError as e:
      report.problem("malformed_annotation",
                     f"{where}: annotations[{j}] (id={ann.get('id')}): {e}")
      return None
    if parsed[-1].size != (height, width):
      report.note("rle_size_differs_from_image", f"{where}: annotations[{j}] RLE size "
                  f"{parsed[-1].size} vs image {(height, width)}")

  problem = _check_image(os.path.join(image_root, entry["file_name"]), check_images)
  if problem is not None:
    kind, message = problem
    report.problem(kind, f"{where}: {message}")
    return None
  queried = entry.get("queried_category", -1)
  queried = queried if _int_id(queried) else -1
  target_kind = ""
  if kinds is not None:
    category_ids = [a.category_id for a in parsed]
    target_kind = _target_kind(queried, category_ids, kinds)
    if not target_kind:
      report.note("unknown_target_kind", f"{where}: no single target kind (queried_category="
                  f"{queried}, annotation categories {sorted(set(category_ids))})")
  return Record(
      datapoint_id=entry["id"], image_id=image_id_from_file_name(entry["file_name"]),
      file_name=entry["file_name"], height=height, width=width, **levels,
      **_annotation_arrays(parsed), queried_category=queried, kind=target_kind,
      origin=origin)
