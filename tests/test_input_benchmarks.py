"""Readers of the paper's other benchmarks in their published layouts, on small hand-made folders:
InstructPart (`input_pipeline.instructpart`) and ReasonSeg (`input_pipeline.reasonseg`)."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from input_pipeline import hmpl, instructpart, reasonseg, sources
from sam3i_jax.evaluation import metrics


def write_image(path, height, width, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def write_mask(path, mask):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(mask, np.uint8)).save(path)


def decode(record, rle):
  return mask_utils.decode({"size": [record.height, record.width], "counts": rle}).astype(bool)


def instructions(tag, n=6):
  return [f"{tag} instruction {j}" for j in range(n)]


def box(height, width, y0, y1, x0, x1, value=1):
  mask = np.zeros((height, width), np.uint8)
  mask[y0:y1, x0:x1] = value
  return mask


@pytest.fixture
def instructpart_split(tmp_path):
  """test/{images,masks,data_test.json}: 2 good part entries among 6 bad ones (named in the
  expected counts below)."""
  split = tmp_path / "test"
  write_image(str(split / "images" / "a.jpg"), 20, 30)
  write_image(str(split / "images" / "b.jpg"), 16, 16, seed=1)
  write_image(str(split / "images" / "d.jpg"), 16, 16, seed=2)
  write_mask(split / "masks" / "a-mug-handle.png", box(20, 30, 2, 6, 3, 8))
  write_mask(split / "masks" / "b-kitchen_knife-blade.png", box(10, 10, 0, 5, 0, 5))
  write_mask(split / "masks" / "b-kitchen_knife-handle.png", box(16, 16, 8, 16, 4, 6))
  write_mask(split / "masks" / "d-cup-rim.png", box(16, 16, 0, 2, 0, 16, value=255))
  write_mask(split / "masks" / "d-cup-base.png", np.zeros((16, 16)))
  data = [
      {"image_path": "images/a.jpg", "part_list": [
          {"object": "mug", "part": "handle", "affordance": "hold", "action": "grasp",
           "instruction": instructions("mug handle")},
          {"object": "mug", "part": "rim", "instruction": instructions("mug rim", n=5)},
          {"object": "mug", "part": "body", "instruction": instructions("mug body")}]},
      {"image_path": "b.jpg", "part_list": [
          {"object": "kitchen knife", "part": "blade", "instruction": instructions("blade")},
          {"object": "kitchen knife", "part": "handle", "instruction": instructions("knife")}]},
      {"image_path": "c.jpg", "part_list": [
          {"object": "pan", "part": "handle", "instruction": instructions("pan")}]},
      {"image_path": "d.jpg", "part_list": [
          {"object": "cup", "part": "rim", "instruction": instructions("cup rim")},
          {"object": "cup", "part": "base", "instruction": instructions("cup base")}]},
  ]
  with open(split / "data_test.json", "w") as f:
    json.dump(data, f)
  return split


def test_instructpart_levels_masks_and_bad_records(instructpart_split):
  report = hmpl.InputReport("skip")
  records = instructpart.read_instructpart_json(str(instructpart_split / "data_test.json"),
                                                text_rules=None, report=report)
  assert report.problems == {"malformed_part_entry": 1, "missing_mask": 1,
                             "mask_size_differs": 1, "missing_image": 1, "bad_mask_values": 1,
                             "empty_mask": 1}
  assert [r.datapoint_id for r in records] == [0, 4]  # positions in the file: stable ids
  mug, knife = records
  # concept = the part-of-object name, simple = the two part sentences, complex = the task
  # instruction and its rewrite (ORPS at the concept level, TRPS at the complex level)
  assert mug.concept == ("mug handle instruction 4",)
  assert mug.simple == ("mug handle instruction 2", "mug handle instruction 3")
  assert mug.complex == ("mug handle instruction 0", "mug handle instruction 1")
  assert (mug.file_name, mug.height, mug.width, mug.kind) == ("a.jpg", 20, 30, "part")
  np.testing.assert_array_equal(decode(mug, mug.rles[0]), box(20, 30, 2, 6, 3, 8).astype(bool))
  np.testing.assert_array_equal(mug.boxes, [[3, 2, 5, 4]])
  # a hand-computed case: the handle is rows 2-5 x cols 3-7 (20 px); a prediction of rows 4-7 x
  # cols 3-7 overlaps it in 10 px, their union is 30 px
  prediction = box(20, 30, 4, 8, 3, 8).astype(bool)
  assert metrics.intersection_union(prediction, decode(mug, mug.rles[0])) == (10, 30)
  assert knife.origin.endswith("data_test.json: [1] part_list[1]")
  assert knife.ignore == b""
  messages = " ".join(m for ms in report.examples.values() for m in ms)
  for named in ("[0] (image_path='images/a.jpg') part_list[1] (object='mug', part='rim'): "
                "instruction holds 5 strings, not 6", "a-mug-body.png not found",
                "b-kitchen_knife-blade.png is (10, 10) where its image is (16, 16)",
                "c.jpg not found", "holds values [0, 255]", "d-cup-base.png marks no pixel"):
    assert named in messages, named


def test_instructpart_first_bad_record_is_an_error_naming_it(instructpart_split):
  with pytest.raises(hmpl.BadInputError, match=r"data_test.json: \[0\] \(image_path='images/a.jpg'\) "
                     r"part_list\[1\] \(object='mug', part='rim'\)"):
    instructpart.read_instructpart_json(str(instructpart_split / "data_test.json"), text_rules=None)


def test_instructpart_json_source_reads_images_beside_the_json(instructpart_split):
  source = sources.JsonSource(str(instructpart_split / "data_test.json"), None,
                              format="instructpart", bad_input="skip", text_rules=None)
  assert len(source) == 2 and sum(source.report.problems.values()) == 6
  with open(instructpart_split / "images" / "a.jpg", "rb") as f:
    assert source[0].image == f.read()


def reasonseg_json(path, shapes, text=("what holds the coffee",), is_sentence=True):
  with open(path, "w") as f:
    json.dump({"text": list(text), "is_sentence": is_sentence,
               "shapes": [{"label": label, "points": points} for label, points in shapes]}, f)


SQUARE = [[2, 2], [10, 2], [10, 10], [2, 10]]  # 9 x 9 pixels, outline included
INNER = [[4.7, 4.2], [6, 4], [6, 6], [4, 6.9]]  # truncated to (4, 4)-(6, 6): 3 x 3 pixels


@pytest.fixture
def reasonseg_split(tmp_path):
  split = tmp_path / "val"
  for name in ("target_then_ignore", "ignore_then_target", "short", "person", "two_points",
               "no_sentence_flag", "stray"):
    write_image(str(split / f"{name}.jpg"), 16, 20)
  reasonseg_json(split / "target_then_ignore.json", [("target", SQUARE), ("ignore", INNER),
                                                     ("flag", [[0, 0], [1, 1]])])
  reasonseg_json(split / "ignore_then_target.json", [("ignore", INNER), ("target", SQUARE)])
  reasonseg_json(split / "short.json", [("target", SQUARE)], text=("the mug",), is_sentence=False)
  reasonseg_json(split / "person.json", [("person", SQUARE)])
  reasonseg_json(split / "two_points.json", [("target", [[1, 1], [5, 5]])])
  reasonseg_json(split / "missing.json", [("target", SQUARE)])
  with open(split / "no_sentence_flag.json", "w") as f:
    json.dump({"text": ["x"], "shapes": [{"label": "target", "points": SQUARE}]}, f)
  return split


def test_reasonseg_targets_ignore_regions_kinds_and_bad_records(reasonseg_split):
  report = hmpl.InputReport("skip")
  records = reasonseg.read_reasonseg_folder(str(reasonseg_split), text_rules=None, report=report)
  assert report.problems == {"unknown_label": 1, "malformed_polygon": 1, "missing_image": 1,
                             "malformed_annotation": 1}
  assert report.notes == {"image_without_annotation": 1}  # stray.jpg
  by_name = {r.file_name: r for r in records}
  assert sorted(by_name) == ["ignore_then_target.jpg", "short.jpg", "target_then_ignore.jpg"]
  first = by_name["target_then_ignore.jpg"]
  # every text at the complex level (the others hold the same strings); long = a sentence
  assert first.complex == first.simple == first.concept == ("what holds the coffee",)
  assert (first.kind, by_name["short.jpg"].kind) == ("long", "short")
  square, inner = box(16, 20, 2, 11, 2, 11).astype(bool), box(16, 20, 4, 7, 4, 7).astype(bool)
  for name in ("target_then_ignore.jpg", "ignore_then_target.jpg"):  # drawn largest first
    record = by_name[name]
    np.testing.assert_array_equal(decode(record, record.rles[0]), square & ~inner, err_msg=name)
    np.testing.assert_array_equal(decode(record, record.ignore), inner, err_msg=name)
  assert by_name["short.jpg"].ignore == b""
  messages = " ".join(m for ms in report.examples.values() for m in ms)
  for named in ("person.json: shapes[0] label 'person' is not one of", "two_points.json: "
                "shapes[0] (target) points", "missing.jpg not found",
                "no_sentence_flag.json: is_sentence None is not true or false"):
    assert named in messages, named


def test_reasonseg_ignore_pixels_count_in_neither_intersection_nor_union(reasonseg_split):
  """A hand-computed case: target 72 px (the 9 x 9 square less the 3 x 3 ignore square), a
  prediction of the whole square (81 px) and of its top 3 rows (27 px, 3 of them in the ignore
  square's first row)."""
  record = next(r for r in reasonseg.read_reasonseg_folder(
      str(reasonseg_split), bad_input="skip", text_rules=None)
      if r.file_name == "target_then_ignore.jpg")
  target, ignore = decode(record, record.rles[0]), decode(record, record.ignore)
  whole, top = box(16, 20, 2, 11, 2, 11).astype(bool), box(16, 20, 2, 5, 2, 11).astype(bool)
  assert metrics.intersection_union(whole, target, ignore) == (72, 72)
  assert metrics.intersection_union(whole, target) == (72, 81)  # without: the 9 px count
  assert metrics.intersection_union(top, target, ignore) == (24, 72)
  with pytest.raises(ValueError, match="ignore region"):
    metrics.intersection_union(whole, target, ignore[:5])


def test_reasonseg_folder_source_and_records_survive_the_features_round_trip(reasonseg_split):
  source = sources.JsonSource(str(reasonseg_split), None, format="reasonseg", bad_input="skip",
                              text_rules=None)
  record = source[[r.file_name for r in source.records].index("target_then_ignore.jpg")]
  again = hmpl.Record.from_features(record.to_features())
  assert again.ignore == record.ignore != b"" and again.kind == "long"
  features = record.to_features()
  del features["ignore"]  # shards of builder 1.1.0
  assert hmpl.Record.from_features(features).ignore == b""


def test_mask_file_names_replace_spaces():
  assert instructpart.mask_file_name("images/IMG 1.jpg", "coffee mug", "top rim") == (
      "IMG_1-coffee_mug-top_rim.png")


def test_instructpart_text_rules_drop_a_bad_string_and_keep_the_level(tmp_path):
  """With the text rules on, an empty task instruction is a problem and dropped; its rewrite
  still makes the complex level."""
  split = tmp_path / "test"
  write_image(str(split / "images" / "a.jpg"), 12, 12)
  write_mask(split / "masks" / "a-mug-handle.png", box(12, 12, 2, 6, 3, 8))
  strings = instructions("mug handle")
  strings[0] = " "
  with open(split / "data_test.json", "w") as f:
    json.dump([{"image_path": "a.jpg", "part_list": [
        {"object": "mug", "part": "handle", "instruction": strings}]}], f)
  report = hmpl.InputReport("skip")
  (record,) = instructpart.read_instructpart_json(str(split / "data_test.json"), report=report)
  assert report.problems == {"empty_instruction": 1}
  assert "part_list[0] (object='mug', part='handle'): instruction[0]" in report.examples[
      "empty_instruction"][0]
  assert record.complex == ("mug handle instruction 1",)


def test_both_layouts_build_into_shards_that_read_back_the_same(instructpart_split,
                                                                 reasonseg_split, tmp_path):
  from input_pipeline import build
  for fmt, name, path in (("instructpart", "InstructPart", instructpart_split / "data_test.json"),
                          ("reasonseg", "ReasonSeg", reasonseg_split)):
    out = tmp_path / "tfds"
    assert build.main(["--format", fmt, "--dataset", name, "--json", f"val={path}",
                       "--out", str(out), "--bad-input", "skip"]) == 0
    direct = sources.JsonSource(str(path), None, format=fmt, bad_input="skip")
    built = sources.TfdsSource(sources.tfds_config_name(name), "val", str(out))
    assert len(built) == len(direct) > 0
    assert built.report.problems == direct.report.problems
    for index in range(len(direct)):
      want = direct[index]
      got = next(built[i] for i in range(len(built)) if built[i].datapoint_id == want.datapoint_id)
      assert (got.file_name, got.kind, got.ignore, got.rles, got.image) == (
          want.file_name, want.kind, want.ignore, want.rles, want.image)
      assert (got.concept, got.simple, got.complex) == (want.concept, want.simple, want.complex)
