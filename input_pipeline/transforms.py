"""Per-example transforms: a `Record` -> one example of the batch contract (numpy, one host).

Train (`TrainTransform`, a grain RandomMap, so deterministic given the pipeline seed and the
element's index):
  1. drop crowd annotations (FilterCrowds) and targets whose clamped box is empty
     (FilterEmptyTargets); a datapoint left with more than `max_targets` targets is dropped whole
     (FilterFindQueriesWithTooManyOut, max 200 in the reference), so batches never hold a cut-down
     target set;
  2. decode the image (RGB, EXIF orientation ignored, like the reference), resize it to a random
     square s x s, s from `sizes`, with PIL's antialiased bilinear filter (what the reference's
     `RandomResizeAPI` runs on PIL images), pad bottom/right to S x S with black and normalise
     with mean = std = 0.5 (padding becomes -1);
  3. targets: boxes from the annotations' bbox (normalised by the JSON's width/height and clamped
     as the reference does), as cxcywh on the canvas; masks on the M x M grid of the canvas
     (`masks.canvas_masks`; an empty mask is replaced by its box); both padded to `max_targets`
     with `target_valid`;
  4. one string per level sampled with the example's RNG (concept: random or the first, see
     `concept_choice`), tokenised with the CLIP tokenizer; concept_id hashes concept[0].
Eval (`EvalTransform`): resize to S x S with `sam3i_jax.preprocess.preprocess` (bit-exact with
SAM 3's processor), no padding, the first string of each level (or the concept the item names),
and under `HOST_KEY` (never sent to a device) the strings themselves with what evaluation groups
and scores by: the dataset name, the target kind ("object", "part", "" unknown) and the ground
truth as RLE, and the prompt's image, category and annotations for COCO AP
(`sam3i_jax.evaluation.coco_ap.instances_json`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import zlib
from typing import Any

import grain
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from input_pipeline import hmpl
from input_pipeline import masks as masks_lib
from sam3i_jax import preprocess
from sam3i_jax.evaluation import coco_ap

logger = logging.getLogger(__name__)

# Every key of the device batch (THE BATCH CONTRACT) and the host-only key of eval batches.
BATCH_KEYS = ("image", "tokens_concept", "tokens_simple", "tokens_complex", "boxes",
              "target_valid", "masks", "concept_id", "datapoint_id", "image_id", "orig_size",
              "content_size", "example_valid")
HOST_KEY = "text"
# The strings under HOST_KEY.
EVAL_TEXT_KEYS = (*hmpl.LEVELS, "dataset", "kind", "ground_truth", "ignore", "instances")
CONCEPT_CHOICES = ("random", "first")
REFERENCE_SIZE = 1008  # SAM 3's image size, for which the train sizes are {480, 512, ..., 992}
REFERENCE_MIN_SIZE = 480
REFERENCE_STRIDE = 32
PAD_VALUE = float(preprocess.normalize(np.zeros(1, np.uint8))[0])  # black after normalisation


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Static shapes of an example: image S, mask grid M, token length L, target slots T."""

  image_size: int
  mask_size: int
  context_length: int
  max_targets: int

  @classmethod
  def from_model_config(cls, model_config: Any, max_targets: int) -> "ExampleSpec":
    """S, M and L from a `Sam3Config` (img_size, mask_size = 4 * grid, context_length)."""
    return cls(model_config.img_size, model_config.mask_size, model_config.context_length,
               max_targets)


def train_sizes(image_size: int) -> tuple[int, ...]:
  """The random square sizes for training at `image_size`.

  At 1008 these are the reference's `get_random_resize_scales(1008, 480)`: 480, 512, ..., 992.
  Another size scales both the smallest size and the stride by image_size / 1008 (stride
  rounded, at least 1; smallest size rounded up to a multiple of the stride), e.g. 224 ->
  112, 119, ..., 224.
  """
  ratio = image_size / REFERENCE_SIZE
  stride = max(1, round(REFERENCE_STRIDE * ratio))
  smallest = stride * -(-round(REFERENCE_MIN_SIZE * ratio) // stride)
  return tuple(range(smallest, image_size + 1, stride))


def concept_id(concept: str) -> int:
  """A 31-bit id of a concept string, equal on every host iff the cleaned strings are equal."""
  return zlib.crc32(concept.lower().strip().encode("utf-8")) & 0x7FFFFFFF


def padding_example(spec: ExampleSpec, with_text: bool = False) -> dict[str, Any]:
  """An example with example_valid=False (fills the last eval batch; a skipped eval record)."""
  s, m, t, l = spec.image_size, spec.mask_size, spec.max_targets, spec.context_length
  example = {
      "image": np.full((s, s, 3), PAD_VALUE, np.float32),
      "tokens_concept": np.zeros(l, np.int32), "tokens_simple": np.zeros(l, np.int32),
      "tokens_complex": np.zeros(l, np.int32), "boxes": np.zeros((t, 4), np.float32),
      "target_valid": np.zeros(t, np.bool_), "masks": np.zeros((t, m, m), np.bool_),
      "concept_id": np.int32(0), "datapoint_id": np.int64(-1), "image_id": np.int64(-1),
      "orig_size": np.zeros(2, np.int32), "content_size": np.zeros(2, np.int32),
      "example_valid": np.bool_(False),
  }
  if with_text:
    example[HOST_KEY] = {key: "" for key in EVAL_TEXT_KEYS}
  return example


def _describe(record: hmpl.Record) -> str:
  return f"{record.origin} (id={record.datapoint_id}, file_name={record.file_name!r})"


def decode_image(record: hmpl.Record) -> Image.Image:
  """The record's RGB image; BadInputError naming the file and record if it cannot be decoded."""
  if record.image is None:
    raise hmpl.BadInputError(f"{_describe(record)}: {record.image_error or 'no image bytes'}")
  try:
    with Image.open(io.BytesIO(record.image)) as image:
      return image.convert("RGB")
  except Exception as e:  # PIL raises many types for corrupt files
    raise hmpl.BadInputError(f"{_describe(record)}: image cannot be decoded "
                             f"({type(e).__name__}: {e})") from e


def target_boxes(record: hmpl.Record) -> np.ndarray:
  """(N, 4) xyxy boxes normalised to the image, clamped as the reference's loader does.

  It normalises [x, y, w, h] by the JSON's width and height and clamps each of x, y, w, h to
  [0, 1] before converting (so x2 = min(x + w, 1)).
  """
  scale = np.array([record.width, record.height] * 2, np.float64)
  xywh = np.clip(record.boxes.astype(np.float64) / scale, 0.0, 1.0)
  xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  return np.minimum(xyxy, 1.0)


def kept_targets(record: hmpl.Record, boxes_xyxy: np.ndarray) -> np.ndarray:
  """Indices of the targets that count: not crowd, and a box of non-zero area."""
  area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
  return np.flatnonzero(~record.iscrowd & (area > 0))


class _ExampleMaker:
  """What train and eval share: targets, tokens and the final example."""

  def __init__(self, spec: ExampleSpec, bad_input: str, vocab_path: str | None):
    if bad_input not in hmpl.BAD_INPUT_POLICIES:
      raise ValueError(f"bad_input must be one of {hmpl.BAD_INPUT_POLICIES}, got {bad_input!r}")
    self.spec, self.bad_input, self.vocab_path = spec, bad_input, vocab_path
    self._tokenizer = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_tokenizer"] = None  # rebuilt in each worker process
    return state

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from sam3i_jax.tokenizer import ClipTokenizer
      self._tokenizer = ClipTokenizer(self.vocab_path)
    return self._tokenizer

  def image_or_none(self, record: hmpl.Record) -> Image.Image | None:
    """The decoded image, or None under bad_input="skip" (logged) if it cannot be decoded."""
    try:
      return decode_image(record)
    except hmpl.BadInputError as e:
      if self.bad_input == "error":
        raise
      logger.warning("skipped: %s", e)
      return None

  def make(self, record: hmpl.Record, targets: np.ndarray, boxes_xyxy: np.ndarray,
           pixels: np.ndarray, orig_size: tuple[int, int], content: int,
           strings: dict[str, str], id_concept: str) -> dict[str, Any]:
    """The example; `id_concept` is the concept string that concept_id hashes."""
    spec = self.spec
    t = spec.max_targets
    ratio = content / spec.image_size
    boxes = boxes_xyxy[targets] * ratio
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    n = len(targets)
    padded_boxes = np.zeros((t, 4), np.float32)
    padded_boxes[:n] = cxcywh
    masks = np.zeros((t, spec.mask_size, spec.mask_size), np.bool_)
    masks[:n] = masks_lib.canvas_masks(
        [record.rles[i] for i in targets], record.rle_sizes[targets], boxes_xyxy[targets],
        grid=spec.mask_size, canvas=spec.image_size, content=content)
    tokens = self.tokenizer([strings[level] for level in hmpl.LEVELS], spec.context_length)
    return {
        "image": pixels, "tokens_concept": tokens[0], "tokens_simple": tokens[1],
        "tokens_complex": tokens[2], "boxes": padded_boxes,
        "target_valid": np.arange(t) < n, "masks": masks,
        "concept_id": np.int32(concept_id(id_concept)),
        "datapoint_id": np.int64(record.datapoint_id), "image_id": np.int64(record.image_id),
        "orig_size": np.array(orig_size, np.int32),
        "content_size": np.array([content, content], np.int32), "example_valid": np.bool_(True),
    }


class TrainTransform(grain.transforms.RandomMap):
  """Record -> training example, or None (grain drops it) for a datapoint that is skipped."""

  def __init__(self, spec: ExampleSpec, *, sizes: tuple[int, ...] | None = None,
               concept_choice: str = "random", bad_input: str = "error",
               vocab_path: str | None = None):
    if concept_choice not in CONCEPT_CHOICES:
      raise ValueError(f"concept_choice must be one of {CONCEPT_CHOICES}, got {concept_choice!r}")
    self.sizes = tuple(sizes or train_sizes(spec.image_size))
    if not self.sizes or max(self.sizes) > spec.image_size or min(self.sizes) < 1:
      raise ValueError(f"train sizes {self.sizes} must lie in [1, {spec.image_size}]")
    self.concept_choice = concept_choice
    self.maker = _ExampleMaker(spec, bad_input, vocab_path)

  def random_map(self, record: hmpl.Record, rng: np.random.Generator) -> dict[str, Any] | None:
    spec = self.maker.spec
    boxes_xyxy = target_boxes(record)
    targets = kept_targets(record, boxes_xyxy)
    if len(targets) > spec.max_targets:
      logger.info("dropped %s: %d targets > max_targets=%d", _describe(record), len(targets),
                  spec.max_targets)
      return None
    image = self.maker.image_or_none(record)
    if image is None:
      return None
    size = int(self.sizes[rng.integers(len(self.sizes))])
    strings = {}
    for level in hmpl.LEVELS:
      options = record.instructions(level)
      first_only = level == "concept" and self.concept_choice == "first"
      strings[level] = options[0 if first_only else rng.integers(len(options))]
    pixels = np.empty((spec.image_size, spec.image_size, 3), np.float32)
    pixels[:size, :size] = preprocess.normalize(
        np.asarray(image.resize((size, size), Image.BILINEAR)))
    pixels[size:] = PAD_VALUE
    pixels[:size, size:] = PAD_VALUE
    return self.maker.make(record, targets, boxes_xyxy, pixels, (image.height, image.width),
                           size, strings, id_concept=record.concept[0])


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """One eval sample: a record (None = padding), which concept string it uses, and the name of
  the dataset it comes from."""

  record: hmpl.Record | None
  concept_index: int = 0
  dataset: str = ""


def ground_truth_rle(record: hmpl.Record) -> str:
  """The OR of all the record's annotations at the image's size, as compressed COCO RLE counts
  (the evaluation target: every annotation of the entry, as SAM3-I's evaluate.py merges them)."""
  if not record.rles:
    return mask_utils.encode(np.zeros((record.height, record.width), np.uint8, order="F")
                             )["counts"].decode("ascii")
  rles = [{"size": [int(h), int(w)], "counts": counts}
          for counts, (h, w) in zip(record.rles, record.rle_sizes)]
  return mask_utils.merge(rles)["counts"].decode("ascii")


def instances(record: hmpl.Record) -> str:
  """The record's image, queried category and annotations, for COCO AP."""
  annotations = [{"id": int(i), "counts": r.decode("ascii"),
                  "bbox": [float(v) for v in box], "iscrowd": bool(crowd)}
                 for i, r, box, crowd in zip(record.annotation_ids, record.rles, record.boxes,
                                             record.iscrowd)]
  return coco_ap.instances_json(record.image_id, record.queried_category, record.height,
                                record.width, annotations)


class EvalTransform(grain.transforms.Map):
  """EvalItem -> eval example with its strings under HOST_KEY; padding for a skipped record.

  A datapoint with more than `max_targets` targets keeps its first `max_targets` (logged): eval
  may not drop samples (every host must run the same number of batches) and the metrics should
  read the full ground truth from the annotation file anyway.
  """

  def __init__(self, spec: ExampleSpec, *, bad_input: str = "error",
               vocab_path: str | None = None):
    self.maker = _ExampleMaker(spec, bad_input, vocab_path)

  def map(self, item: EvalItem) -> dict[str, Any]:
    spec, record = self.maker.spec, item.record
    image = None if record is None else self.maker.image_or_none(record)
    if image is None:
      return padding_example(spec, with_text=True)
    boxes_xyxy = target_boxes(record)
    targets = kept_targets(record, boxes_xyxy)
    if len(targets) > spec.max_targets:
      logger.warning("%s: %d targets, kept the first max_targets=%d", _describe(record),
                     len(targets), spec.max_targets)
      targets = targets[:spec.max_targets]
    strings = {"concept": record.concept[item.concept_index], "simple": record.simple[0],
               "complex": record.complex[0], "dataset": item.dataset, "kind": record.kind,
               "ground_truth": ground_truth_rle(record), "ignore": record.ignore.decode("ascii"),
               "instances": instances(record)}
    pixels = preprocess.preprocess(np.asarray(image), spec.image_size)
    example = self.maker.make(record, targets, boxes_xyxy, pixels, (image.height, image.width),
                              spec.image_size, strings, id_concept=strings["concept"])
    example[HOST_KEY] = strings
    return example
