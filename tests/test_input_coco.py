"""The COCO instances reader (input_pipeline/coco.py) on hand-made files with good and bad records."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from input_pipeline import coco, hmpl

H, W = 20, 30
CATEGORIES = [{"id": 1, "name": "car"}, {"id": 2, "name": "wheel"}, {"id": 5, "name": "mug"},
              {"id": 7, "name": "flag"}]


def _ann(ann_id, image_id, category_id, segmentation=None):
  if segmentation is None:  # a polygon
    segmentation = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]
  return {"id": ann_id, "image_id": image_id, "category_id": category_id,
          "segmentation": segmentation, "iscrowd": 0}


def _write(tmp_path, images, annotations, categories=CATEGORIES, corrupt=()) -> str:
  for entry in images:
    if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
      if entry["file_name"] in corrupt:
        (tmp_path / entry["file_name"]).write_bytes(b"\x89PNG not really")
      else:
        Image.new("RGB", (W, H), (10, 200, 10)).save(tmp_path / entry["file_name"])
  path = tmp_path / "instances_train.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": categories}))
  return str(path)


def _image(image_id, name=None):
  return {"id": image_id, "file_name": name or f"{image_id:06d}.png", "width": W, "height": H}


def _good_file(tmp_path):
  rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 5), np.uint8), ((3, 13), (4, 21)))))
  rle["counts"] = rle["counts"].decode("ascii")
  annotations = [_ann(10, 3, 1), _ann(11, 3, 2, rle), _ann(12, 3, 1),
                 _ann(13, 4, 5, {"size": [H, W], "counts": [100, 20, 480]})]
  return _write(tmp_path, [_image(4), _image(3)], annotations)


def test_one_datapoint_per_image_and_category_with_all_negatives(tmp_path):
  records = coco.read_coco_json(_good_file(tmp_path), str(tmp_path), negatives=1.0)
  # Every image is prompted with every category, as SAM 3 evaluates.
  assert [(r.image_id, r.queried_category) for r in records] == [
      (3, 1), (3, 2), (3, 5), (3, 7), (4, 1), (4, 2), (4, 5), (4, 7)]
  by_key = {(r.image_id, r.queried_category): r for r in records}
  car = by_key[(3, 1)]
  assert car.concept == car.simple == car.complex == ("car",) and car.kind == "object"
  assert car.annotation_ids.tolist() == [10, 12] and car.category_ids.tolist() == [1, 1]
  assert car.datapoint_id == 3 * 8 + 1 and car.file_name == "000003.png"
  assert car.boxes[0].tolist() == [2.0, 2.0, 10.0, 8.0]
  assert by_key[(3, 2)].annotation_ids.tolist() == [11]
  assert by_key[(4, 5)].annotation_ids.tolist() == [13]  # an uncompressed RLE
  negative = by_key[(3, 7)]
  assert negative.rles == () and negative.boxes.shape == (0, 4) and negative.concept == ("flag",)
  assert len({r.datapoint_id for r in records}) == len(records)


def test_a_share_of_negatives_chosen_reproducibly(tmp_path):
  path = _good_file(tmp_path)
  none = coco.read_coco_json(path, str(tmp_path), negatives=0.0)
  assert [(r.image_id, r.queried_category) for r in none] == [(3, 1), (3, 2), (4, 5)]
  half = coco.read_coco_json(path, str(tmp_path), negatives=0.5, seed=3)
  negatives = [(r.image_id, r.queried_category) for r in half if not r.rles]
  # Image 3 lacks 2 categories, image 4 lacks 3: round(0.5 * n) of each.
  assert sum(i == 3 for i, _ in negatives) == 1 and sum(i == 4 for i, _ in negatives) == 2
  again = coco.read_coco_json(path, str(tmp_path), negatives=0.5, seed=3)
  assert [r.datapoint_id for r in again] == [r.datapoint_id for r in half]
  with pytest.raises(ValueError, match="negatives must be a share"):
    coco.read_coco_json(path, str(tmp_path), negatives=1.5)


def _bad_file(tmp_path):
  images = [_image(1), _image(1, "again.png"), {"id": 2, "file_name": "x.png"}, _image(3),
            _image(4), _image(6, "corrupt.png"), "not an entry"]
  annotations = [_ann(20, 1, 1), _ann(21, 9, 1),  # image 9 does not exist
                 _ann(22, 3, 1, {"size": [H, W], "counts": [10, 5]}),  # counts do not cover H x W
                 _ann(23, 4, 3)]  # category 3 is malformed below
  categories = CATEGORIES + [{"id": 3}, {"id": 1, "name": "duplicate car"}]
  return _write(tmp_path, images, annotations, categories, corrupt=("corrupt.png",))


def test_bad_records_are_skipped_and_counted(tmp_path):
  report = hmpl.InputReport("skip")
  records = coco.read_coco_json(_bad_file(tmp_path), str(tmp_path), check_images="decode",
                                report=report)
  assert {r.image_id for r in records} == {1}  # images 3, 4 and 6 dropped whole
  assert report.problems == {
      "duplicate_image_id": 1, "malformed_image_entry": 2, "unknown_image_id": 1,
      "malformed_annotation": 1, "unknown_category_id": 1, "corrupt_image": 1,
      "malformed_category": 1, "duplicate_category_id": 1}
  examples = report.examples
  assert "instances_train.json: images[1] (id=1, file_name='again.png'): id already used by " \
         "images[0]" in examples["duplicate_image_id"][0]
  assert "images[4] (id=4, file_name='000004.png'): annotations[3] (id=23): category_id 3" \
         in examples["unknown_category_id"][0]
  assert "annotations[2] (id=22)" in examples["malformed_annotation"][0]
  assert "annotations[1] (id=21, image_id=9)" in examples["unknown_image_id"][0]


@pytest.mark.parametrize("change, expected", [
    ("image", r"images\[1\] \(id=1, file_name='again.png'\): id already used"),
    ("annotation", r"images\[0\] \(id=1, file_name='000001.png'\): annotations\[0\] \(id=20\): "
                   r"malformed segmentation"),
    ("category", r"categories\[1\] \(id=2, name=''\): needs an integer id and a non-empty name"),
])
def test_bad_input_error_names_file_and_record(tmp_path, change, expected):
  images, annotations, categories = [_image(1)], [_ann(20, 1, 1)], list(CATEGORIES)
  if change == "image":
    images.append(_image(1, "again.png"))
  elif change == "annotation":
    annotations[0]["segmentation"] = {"size": [H, W], "counts": "!!"}
  else:
    categories[1] = {"id": 2, "name": ""}
  path = _write(tmp_path, images, annotations, categories)
  with pytest.raises(hmpl.BadInputError, match=expected) as error:
    coco.read_coco_json(path, str(tmp_path))
  assert "instances_train.json" in str(error.value)


def test_a_file_without_categories_is_refused(tmp_path):
  path = _write(tmp_path, [_image(1)], [], categories=[])
  with pytest.raises(hmpl.BadInputError, match="no usable categories"):
    coco.read_coco_json(path, str(tmp_path))


def test_the_documented_minimal_example_reads_as_the_readme_says():
  """docs/examples/instances_minimal.json, docs/finetuning.md's example: 2 images x 2
  categories."""
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "examples",
                      "instances_minimal.json")
  records = coco.read_coco_json(path, "images", check_images="none")
  assert [(r.image_id, r.concept[0], len(r.rles)) for r in records] == [
      (1, "traffic cone", 2), (1, "manhole cover", 0), (2, "traffic cone", 0),
      (2, "manhole cover", 1)]
  assert records[3].boxes.tolist() == [[320.0, 340.0, 3.0, 20.0]]  # the RLE's own box
