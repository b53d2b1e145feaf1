"""Per-example transforms: image geometry, masks, boxes, target filtering, strings and tokens."""

import dataclasses
import io

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image, ImageDraw

from input_pipeline import hmpl
from input_pipeline import masks as masks_lib
from input_pipeline import transforms
from sam3i_jax import preprocess
from sam3i_jax.tokenizer import ClipTokenizer

SPEC = transforms.ExampleSpec(image_size=224, mask_size=64, context_length=32, max_targets=4)


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _record(h=96, w=128, boxes=((32, 16, 64, 32),), iscrowd=None, masks=None, **changes):
  """A record over a random image; each target's mask fills its box unless given."""
  rng = np.random.default_rng(h * w)
  if masks is None:
    masks = []
    for x, y, bw, bh in boxes:
      m = np.zeros((h, w), np.uint8)
      m[int(y):int(y + bh), int(x):int(x + bw)] = 1
      masks.append(m)
  rles = tuple(mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks)
  n = len(rles)
  fields = dict(
      datapoint_id=7, image_id=70, file_name="x.png", height=h, width=w,
      concept=("cube", "block"), simple=("the red cube", "the left cube", "cube one"),
      complex=("what you stack",), rles=rles,
      rle_sizes=np.array([[h, w]] * n, np.int32).reshape(-1, 2),
      boxes=np.array(boxes, np.float32).reshape(-1, 4),
      iscrowd=np.zeros(n, bool) if iscrowd is None else np.array(iscrowd),
      category_ids=np.ones(n, np.int64), annotation_ids=np.arange(n, dtype=np.int64),
      origin="set.json: images[3]",
      image=_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
  fields.update(changes)
  return hmpl.Record(**fields)


def test_train_sizes_follow_the_reference_and_scale():
  assert transforms.train_sizes(1008) == tuple(range(480, 993, 32))  # 480, 512, ..., 992
  assert transforms.train_sizes(224) == tuple(range(112, 225, 7))
  assert transforms.train_sizes(168) == tuple(range(80, 169, 5))  # 80, 85, ..., 165
  for size in (224, 168, 1008, 518):
    sizes = transforms.train_sizes(size)
    assert len(sizes) >= 16 and max(sizes) <= size and min(sizes) >= size * 0.45


def test_eval_image_is_preprocess_bit_for_bit():
  record = _record(h=77, w=131)
  example = transforms.EvalTransform(SPEC).map(transforms.EvalItem(record))
  pixels = np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB"))
  np.testing.assert_array_equal(example["image"], preprocess.preprocess(pixels, 224))
  assert example["content_size"].tolist() == [224, 224]
  assert example["orig_size"].tolist() == [77, 131]


def test_train_image_is_resized_padded_and_normalised():
  record = _record()
  transform = transforms.TrainTransform(SPEC)
  example = transform.random_map(record, np.random.default_rng(0))
  s = int(example["content_size"][0])
  assert s in transform.sizes and example["content_size"].tolist() == [s, s]
  pixels = Image.open(io.BytesIO(record.image)).convert("RGB")
  expected = preprocess.normalize(np.asarray(pixels.resize((s, s), Image.BILINEAR)))
  np.testing.assert_array_equal(example["image"][:s, :s], expected)
  assert (example["image"][s:] == -1).all() and (example["image"][:, s:] == -1).all()
  sizes = {int(transform.random_map(record, np.random.default_rng(k))["content_size"][0])
           for k in range(40)}
  assert len(sizes) > 8 and sizes <= set(transform.sizes)


def test_boxes_are_cxcywh_on_the_canvas_and_clamped_like_the_reference():
  # Image 128x96; second box sticks out right and bottom: x 100 + w 60 -> clamped at 128.
  record = _record(boxes=((32, 16, 64, 32), (100, 80, 60, 40)))
  transform = transforms.TrainTransform(SPEC, sizes=(112,))
  example = transform.random_map(record, np.random.default_rng(0))
  f = 112 / 224
  x1, y1, x2, y2 = 32 / 128, 16 / 96, 96 / 128, 48 / 96
  first = [(x1 + x2) / 2 * f, (y1 + y2) / 2 * f, (x2 - x1) * f, (y2 - y1) * f]
  x1, y1 = 100 / 128, 80 / 96
  second = [(x1 + 1) / 2 * f, (y1 + 1) / 2 * f, (1 - x1) * f, (1 - y1) * f]
  np.testing.assert_allclose(example["boxes"][:2], [first, second], rtol=1e-6)
  assert example["target_valid"].tolist() == [True, True, False, False]
  assert not example["boxes"][2:].any() and not example["masks"][2:].any()


def _straightforward_mask(mask: np.ndarray, content: int, canvas: int, grid: int) -> np.ndarray:
  """decode -> resize to s (torchvision's uint8 kernel) -> pad to S -> bilinear to M, > 0."""
  resized = preprocess.resize_uint8(mask[:, :, None].astype(np.uint8), content, content)[:, :, 0]
  padded = np.zeros((canvas, canvas), np.float64)
  padded[:content, :content] = resized
  x = np.maximum((np.arange(grid) + 0.5) * canvas / grid - 0.5, 0)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, canvas - 1)
  frac = x - lo
  rows = padded[lo] * (1 - frac)[:, None] + padded[hi] * frac[:, None]
  return (rows[:, lo] * (1 - frac) + rows[:, hi] * frac) > 0


@pytest.mark.parametrize("h, w, content, canvas, grid", [
    (480, 640, 480, 1008, 288), (480, 640, 992, 1008, 288), (256, 256, 736, 1008, 288),
    (256, 256, 119, 224, 64), (256, 256, 224, 224, 64), (333, 500, 1008, 1008, 288)])
def test_canvas_masks_agree_with_the_full_resolution_path(h, w, content, canvas, grid):
  rng = np.random.default_rng(h + content)
  masks = []
  for _ in range(3):
    image = Image.new("L", (w, h))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
      cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, min(h, w) / 4)
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    draw.polygon([tuple(p) for p in rng.uniform(0, 1, (4, 2)) * (w, h)], fill=1)
    masks.append(np.asarray(image))
  rles = [mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks]
  fast = masks_lib.canvas_masks(rles, np.array([[h, w]] * 3), np.zeros((3, 4)), grid=grid,
                                canvas=canvas, content=content)
  for mask, got in zip(masks, fast):
    expected = _straightforward_mask(mask, content, canvas, grid)
    assert expected.any()
    assert (got == expected).mean() >= 0.999  # measured: >= 0.9996
    assert (got != expected).sum() <= 0.01 * expected.sum()  # measured: <= 0.003


def test_masks_follow_their_own_size_and_empty_masks_become_boxes():
  square = np.zeros((50, 60), np.uint8)  # an RLE at half the image's resolution
  square[10:30, 0:30] = 1
  record = _record(h=100, w=120, boxes=((0, 20, 60, 40), (60, 0, 60, 50)),
                   masks=[square, np.zeros((100, 120), np.uint8)])
  record = dataclasses.replace(record, rle_sizes=np.array([[50, 60], [100, 120]], np.int32))
  example = transforms.EvalTransform(SPEC).map(transforms.EvalItem(record))
  masks = example["masks"]  # 64x64 grid over the whole 224 canvas
  # object 0 covers rows 20%..60% and columns 0..50% of the image; object 1 (empty) its box
  for mask, (x0, y0, x1, y1) in zip(masks[:2], [(0, .2, .5, .6), (.5, 0, 1, .5)]):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert abs(rows[0] - y0 * 64) <= 1 and abs(rows[-1] + 1 - y1 * 64) <= 1
    assert abs(cols[0] - x0 * 64) <= 1 and abs(cols[-1] + 1 - x1 * 64) <= 1


def test_crowds_and_empty_boxes_are_dropped_too_many_targets_drop_the_datapoint():
  boxes = ((0, 0, 10, 10), (20, 20, 10, 10), (40, 40, 0, 5), (60, 60, 10, 10))
  record = _record(boxes=boxes, iscrowd=[False, True, False, False])
  train = transforms.TrainTransform(SPEC)
  example = train.random_map(record, np.random.default_rng(0))
  assert example["target_valid"].sum() == 2  # targets 0 and 3
  many = _record(boxes=[(i * 10, 0, 8, 8) for i in range(5)])  # 5 > max_targets 4
  assert train.random_map(many, np.random.default_rng(0)) is None
  evaluated = transforms.EvalTransform(SPEC).map(transforms.EvalItem(many))
  assert evaluated["target_valid"].all()  # eval keeps the first 4


def test_strings_tokens_and_concept_id():
  record = _record()
  tokenizer = ClipTokenizer()
  picks = {level: set() for level in hmpl.LEVELS}
  for seed in range(30):
    example = transforms.TrainTransform(SPEC).random_map(record, np.random.default_rng(seed))
    for level in hmpl.LEVELS:
      options = record.instructions(level)
      row = example[f"tokens_{level}"]
      matches = [s for s in options if (tokenizer([s], 32)[0] == row).all()]
      assert len(matches) == 1
      picks[level].add(matches[0])
    assert example["concept_id"] == transforms.concept_id("cube")
  assert picks == {level: set(record.instructions(level)) for level in hmpl.LEVELS}
  first = transforms.TrainTransform(SPEC, concept_choice="first")
  for seed in range(5):
    example = first.random_map(record, np.random.default_rng(seed))
    assert (example["tokens_concept"] == tokenizer(["cube"], 32)[0]).all()
  assert transforms.concept_id(" Cube ") == transforms.concept_id("cube")
  assert transforms.concept_id("cube") != transforms.concept_id("cubes")
  assert 0 <= transforms.concept_id("cube") < 2**31
  assert set(example) == set(transforms.BATCH_KEYS)  # no kind (nor any string) in training
  evaluated = transforms.EvalTransform(SPEC).map(
      transforms.EvalItem(dataclasses.replace(record, kind="part"), concept_index=1,
                          dataset="cubes"))
  host = evaluated[transforms.HOST_KEY]
  assert set(host) == set(transforms.EVAL_TEXT_KEYS)
  assert {key: host[key] for key in (*hmpl.LEVELS, "dataset", "kind")} == {
      "concept": "block", "simple": "the red cube", "complex": "what you stack",
      "dataset": "cubes", "kind": "part"}
  size = [record.height, record.width]
  union = mask_utils.decode({"size": size, "counts": host["ground_truth"]})
  each = mask_utils.decode([{"size": size, "counts": rle} for rle in record.rles])
  np.testing.assert_array_equal(union, each.any(axis=-1))
  assert union.any()
  assert evaluated["concept_id"] == transforms.concept_id("block")


def test_same_rng_same_example():
  record = _record()
  a = transforms.TrainTransform(SPEC).random_map(record, np.random.default_rng(3))
  b = transforms.TrainTransform(SPEC).random_map(record, np.random.default_rng(3))
  for key in transforms.BATCH_KEYS:
    np.testing.assert_array_equal(a[key], b[key])


def test_corrupt_image_error_or_skip():
  record = _record(image=b"not an image")
  where = r"set.json: images\[3\] \(id=7, file_name='x.png'\)"
  with pytest.raises(hmpl.BadInputError, match=where):
    transforms.TrainTransform(SPEC).random_map(record, np.random.default_rng(0))
  skip = transforms.TrainTransform(SPEC, bad_input="skip")
  assert skip.random_map(record, np.random.default_rng(0)) is None
  padding = transforms.EvalTransform(SPEC, bad_input="skip").map(transforms.EvalItem(record))
  assert not padding["example_valid"] and padding["datapoint_id"] == -1
  assert padding[transforms.HOST_KEY] == {key: "" for key in transforms.EVAL_TEXT_KEYS}
  missing = _record(image=None, image_error="image file /d/x.png cannot be read")
  with pytest.raises(hmpl.BadInputError, match="/d/x.png cannot be read"):
    transforms.EvalTransform(SPEC).map(transforms.EvalItem(missing))
