"""HMPL-Instruct reader: formats, validation, bad-input errors and skip counts."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from input_pipeline import hmpl
from input_pipeline import masks as masks_lib
from input_pipeline import sources

H, W = 40, 60


def _rle(mask: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _square(y0=5, x0=10, size=12) -> np.ndarray:
  mask = np.zeros((H, W), bool)
  mask[y0:y0 + size, x0:x0 + size] = True
  return mask


def _entry(i: int, **changes) -> dict:
  entry = {"id": i, "file_name": f"img{i}.png", "width": W, "height": H,
           "text_inst_input": {"concept": ["cube"], "simple_query": ["the red cube"],
                               "complex_query": ["something to build a tower with"]}}
  entry.update(changes)
  return entry


def _ann(i: int, image_id: int, **changes) -> dict:
  ann = {"id": i, "image_id": image_id, "category_id": 1, "bbox": [10, 5, 12, 12],
         "segmentation": _rle(_square()), "iscrowd": 0, "area": 144}
  ann.update(changes)
  return ann


def _write(tmp_path, images, annotations, files=None) -> str:
  for entry in images:
    if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
      Image.new("RGB", (W, H), (200, 10, 10)).save(tmp_path / entry["file_name"])
  for name, data in (files or {}).items():
    (tmp_path / name).write_bytes(data)
  path = tmp_path / "sam3i_train.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": "cube"}]}))
  return str(path)


def test_reads_all_segmentation_formats_and_groups_annotations(tmp_path):
  square = _square()
  polygon = [[10, 5, 22, 5, 22, 17, 10, 17]]
  flat = square.reshape(-1, order="F").astype(np.int8)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
  uncompressed = {"size": [H, W], "counts": np.diff(bounds).tolist()}
  anns = [_ann(1, 7), _ann(2, 3, segmentation=polygon, iscrowd=1),
          _ann(3, 7, segmentation=uncompressed), _ann(4, 7, bbox=None)]
  del anns[3]["bbox"]
  path = _write(tmp_path, [_entry(7), _entry(3), _entry(5)], anns)
  records = hmpl.read_hmpl_json(path, str(tmp_path))
  assert [r.datapoint_id for r in records] == [3, 5, 7]  # sorted by id, like the reference
  three, five, seven = records
  assert len(five.rles) == 0 and five.boxes.shape == (0, 4)  # a negative
  assert three.iscrowd.tolist() == [True] and seven.iscrowd.tolist() == [False] * 3
  assert seven.annotation_ids.tolist() == [1, 3, 4]
  expected_polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W)))
  decoded = [mask_utils.decode({"size": [H, W], "counts": c}) for c in three.rles + seven.rles]
  np.testing.assert_array_equal(decoded[0], expected_polygon)
  for mask in decoded[1:]:
    np.testing.assert_array_equal(mask, square)
  # a missing bbox is the mask's box
  np.testing.assert_allclose(seven.boxes[2], [10, 5, 12, 12])
  assert three.image_id == hmpl.image_id_from_file_name("img3.png")
  assert hmpl.image_id_from_file_name("train2017/000000123456.jpg") == 123456
  source = sources.JsonSource(path, str(tmp_path))
  assert source[0].image == (tmp_path / "img3.png").read_bytes()


def test_rle_counts_decoder_matches_pycocotools():
  rng = np.random.default_rng(0)
  for _ in range(20):
    h, w = rng.integers(1, 50, size=2)
    mask = rng.random((h, w)) < rng.random()
    counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    flat = mask.reshape(-1, order="F").astype(np.int8)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    expected = ([0] if flat[0] else []) + runs.tolist()
    assert masks_lib.decode_rle_counts(counts) == expected


@pytest.mark.parametrize("segmentation, message", [
    ({"size": [H, W], "counts": "0i6"}, "runs cover"),  # too many pixels: would overrun memory
    ({"size": [H, W], "counts": "a~"}, "invalid character"),
    ({"size": [H, W], "counts": "1Y"}, "ends inside a number"),
    ({"size": [H, W], "counts": [10, 5]}, "runs cover"),
    ({"size": [H, W], "counts": [-5, H * W + 5]}, "negative"),
    ({"size": [H], "counts": "0"}, "size"),
    ([[1, 2, 3, 4]], "coordinates"),
    ([[1, 2, 3, 4, 5, "x"]], "finite numbers"),
    ("polygon", "expected polygons"),
])
def test_malformed_segmentations_are_rejected(segmentation, message):
  with pytest.raises(masks_lib.SegmentationError, match=message):
    masks_lib.to_compressed_rle(segmentation, H, W)


def _bad_set(tmp_path):
  """Five good records and one instance of each kind of bad input."""
  images = [_entry(i) for i in range(5)]
  images += [
      _entry(10, file_name="missing.png"),
      _entry(11, file_name="corrupt.png"),
      _entry(12),  # gets a malformed segmentation
      _entry(13, text_inst_input={"concept": ["cube"], "simple_query": [],
                                  "complex_query": ["x"]}),
      _entry(14, text_inst_input={"concept": ["cube"], "simple_query": ["a " * 40],
                                  "complex_query": ["x"]}),
      _entry(15, text_inst_input={"concept": ["cube"], "complex_query": ["x"],
                                  "simple_query": ["le cube rouge, s'il vous plaît"]}),
      _entry(2),  # duplicate id
  ]
  annotations = [_ann(i, i) for i in range(5)]
  annotations += [_ann(20, 12, segmentation={"size": [H, W], "counts": [1, 2]}),
                  _ann(21, 99)]  # no such image
  present = [i for i in images if i["file_name"] not in ("missing.png", "corrupt.png")]
  path = _write(tmp_path, present, annotations, files={"corrupt.png": b"\x89PNG not really"})
  data = json.loads(open(path).read())
  data["images"] = images
  open(path, "w").write(json.dumps(data))
  return path


def test_bad_input_skip_counts_every_kind(tmp_path):
  path = _bad_set(tmp_path)
  rules = hmpl.TextRules(overlong="invalid", non_ascii="invalid")
  report = hmpl.InputReport("skip")
  records = hmpl.read_hmpl_json(path, str(tmp_path), check_images="decode", text_rules=rules,
                                report=report)
  assert [r.datapoint_id for r in records] == [0, 1, 2, 3, 4]
  assert dict(report.problems) == {
      "duplicate_image_id": 1, "unknown_image_id": 1, "missing_image": 1, "corrupt_image": 1,
      "malformed_annotation": 1, "empty_instructions": 3, "overlong_instruction": 1,
      "non_ascii_instruction": 1}
  assert any("images[8] (id=13" in m for m in report.examples["empty_instructions"])


def test_lenient_text_rules_keep_and_count(tmp_path):
  path = _bad_set(tmp_path)
  report = hmpl.InputReport("skip")
  records = hmpl.read_hmpl_json(path, str(tmp_path), text_rules=hmpl.TextRules(), report=report)
  assert {14, 15} <= {r.datapoint_id for r in records}
  assert report.notes["truncated_instruction"] == 1
  assert report.notes["non_ascii_instruction"] == 1
  assert "corrupt_image" not in report.problems  # only "decode" opens the files


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["images"].append(_entry(3)), r"images\[5\] \(id=3.*duplicate_image_id"),
    (lambda d: d["annotations"].append(_ann(9, 42)),
     r"annotations\[5\] \(id=9, image_id=42\).*unknown_image_id"),
    (lambda d: d["images"][1].update(file_name="gone.png"),
     r"images\[1\] \(id=1, file_name='gone.png'\).*gone.png not found"),
    (lambda d: d["annotations"][2].update(segmentation=[[1, 2]]),
     r"images\[2\] \(id=2.*annotations\[2\] \(id=2\): malformed segmentation"),
    (lambda d: d["images"][4]["text_inst_input"].update(complex_query=[]),
     r"images\[4\] \(id=4.*complex_query is missing or empty"),
    (lambda d: d["images"][0]["text_inst_input"].update(simple_query=["word " * 40]),
     r"images\[0\] \(id=0.*simple_query\[0\].*tokens > 32.*overlong"),
    (lambda d: d["images"][0]["text_inst_input"].update(concept=["café"]),
     r"images\[0\] \(id=0.*concept\[0\].*not ASCII"),
    (lambda d: d["categories"].append({"id": "2", "name": "cube:face"}),
     r"categories\[1\] \(id='2', name='cube:face'\): needs an integer id.*malformed_category"),
    (lambda d: d["categories"].append({"id": 1, "name": "cube:face"}),
     r"categories\[1\] \(id=1, .*already used by categories\[0\].*duplicate_category_id"),
    (lambda d: d.update(categories={"1": "cube"}), r"'categories' is not a list"),
])
def test_bad_input_error_names_file_and_record(tmp_path, change, expected):
  path = _write(tmp_path, [_entry(i) for i in range(5)], [_ann(i, i) for i in range(5)])
  data = json.loads(open(path).read())
  change(data)
  open(path, "w").write(json.dumps(data))
  rules = hmpl.TextRules(overlong="invalid", non_ascii="invalid")
  with pytest.raises(hmpl.BadInputError, match=expected) as error:
    hmpl.read_hmpl_json(path, str(tmp_path), text_rules=rules)
  assert str(path) in str(error.value)


def test_unreadable_json_is_an_error(tmp_path):
  bad = tmp_path / "sam3i_train.json"
  bad.write_text("{not json")
  with pytest.raises(hmpl.BadInputError, match="not a readable JSON"):
    hmpl.read_hmpl_json(str(bad), str(tmp_path))
  with pytest.raises(hmpl.BadInputError, match="not found"):
    hmpl.read_hmpl_json(str(tmp_path / "nope.json"), str(tmp_path))


def test_category_kind_follows_paco_names():
  assert hmpl.category_kind("mug:handle") == "part"
  assert hmpl.category_kind("car_(automobile):wheel") == "part"
  assert hmpl.category_kind("car_(automobile)") == "object"
  assert hmpl.category_kind("mug handle") == "object"


def _kinds_file(tmp_path, categories):
  """Datapoints whose kind comes from the queried category, the annotations, or nothing."""
  images = [_entry(0, queried_category=1), _entry(1, queried_category=2),
            _entry(2, queried_category=2), _entry(3), _entry(4), _entry(5),
            _entry(6, queried_category=99)]
  annotations = [_ann(10, 0, category_id=1), _ann(11, 1, category_id=2),
                 _ann(12, 3, category_id=2), _ann(13, 3, category_id=2),
                 _ann(14, 5, category_id=1), _ann(15, 5, category_id=2),
                 _ann(16, 6, category_id=1)]
  path = _write(tmp_path, images, annotations)
  data = json.loads(open(path).read())
  if categories is None:
    del data["categories"]
  else:
    data["categories"] = categories
  open(path, "w").write(json.dumps(data))
  return path


CATEGORIES = [{"id": 1, "name": "cube"}, {"id": 2, "name": "cube:face"},
              {"id": 3, "name": "sphere"}]


def test_target_kinds_of_objects_parts_and_negatives(tmp_path):
  report = hmpl.InputReport()
  records = hmpl.read_hmpl_json(_kinds_file(tmp_path, CATEGORIES), str(tmp_path), report=report)
  # 0 queries an object; 1 a part; 2 is a negative querying a part; 3 has no queried category
  # and part annotations; 4 a negative with no queried category; 5 mixes both kinds; 6 queries
  # an id that is not in categories[] and has an object annotation.
  assert [r.kind for r in records] == ["object", "part", "part", "part", "", "", "object"]
  assert report.notes == {"unknown_target_kind": 2}
  assert any("images[5] (id=5" in m and "[1, 2]" in m
             for m in report.examples["unknown_target_kind"])
  assert not report.problems


def test_target_kind_is_unknown_without_categories(tmp_path):
  for categories in (None, []):
    report = hmpl.InputReport()
    records = hmpl.read_hmpl_json(_kinds_file(tmp_path, categories), str(tmp_path),
                                  report=report)
    assert [r.kind for r in records] == [""] * 7
    assert not report.notes and not report.problems


def test_bad_category_entries_are_skipped_alone(tmp_path):
  categories = [{"id": 1, "name": "cube"}, {"id": 2, "name": ""}, {"id": 1, "name": "cube:x"},
                "sphere"]
  report = hmpl.InputReport("skip")
  records = hmpl.read_hmpl_json(_kinds_file(tmp_path, categories), str(tmp_path), report=report)
  assert len(records) == 7  # no datapoint is dropped for a bad category entry
  assert [r.kind for r in records] == ["object", "", "", "", "", "", "object"]
  assert report.problems == {"malformed_category": 2, "duplicate_category_id": 1}
  assert any("categories[3] (id=None, name=None)" in m
             for m in report.examples["malformed_category"])
