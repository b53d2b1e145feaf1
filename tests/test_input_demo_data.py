"""The generated demo set: layout, determinism, version stamp, and instructions that fit their
targets, read through the real reader."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from input_pipeline import demo_data
from input_pipeline import hmpl

SMALL = dict(num_train_images=24, num_val_images=8)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  return demo_data.ensure_demo_data(tmp_path_factory.mktemp("a") / "demo", **SMALL)


def _files(root):
  return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_determinism_and_stamp(small, tmp_path):
  expected = [f"{s}/sam3i_{split}.json" for s in demo_data.SUBSETS for split in ("train", "val")]
  files = _files(small)
  assert {str(f) for f in files} >= set(expected)
  assert len([f for f in files if f.suffix == ".jpg"]) == 24 + 8
  again = demo_data.ensure_demo_data(tmp_path / "b", **SMALL)
  assert files == _files(again)
  for name in files:
    if name.name != demo_data.STAMP_FILE:
      assert (small / name).read_bytes() == (again / name).read_bytes(), name
  stamp = (again / demo_data.STAMP_FILE).stat().st_mtime_ns
  demo_data.ensure_demo_data(again, **SMALL)  # same stamp: reused as is
  assert (again / demo_data.STAMP_FILE).stat().st_mtime_ns == stamp
  demo_data.ensure_demo_data(again, num_train_images=4, num_val_images=2)  # new stamp: rebuilt
  assert len(list((again / "images" / "train").iterdir())) == 4
  (again / demo_data.STAMP_FILE).write_text("{}")
  demo_data.ensure_demo_data(again, **SMALL)
  assert len(list((again / "images" / "train").iterdir())) == 24
  other = tmp_path / "user_data"
  (other / "mine").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="not overwriting"):
    demo_data.ensure_demo_data(other, **SMALL)
  assert (other / "mine").exists()


def test_default_set_is_small_and_fills_every_subset(tmp_path, monkeypatch):
  """(Its generation time is measured by benchmarks/input_pipeline.py.)"""
  monkeypatch.setenv(demo_data.ENV_VAR, str(tmp_path))
  root = demo_data.ensure_demo_data()
  assert root == tmp_path / "demo_hmpl"
  sizes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
  assert sizes < 10 * 2**20
  counts = {}
  for subset in demo_data.SUBSETS:
    with open(root / subset / "sam3i_train.json") as f:
      counts[subset] = len(json.load(f)["images"])
  assert sum(counts.values()) >= 600 and min(counts.values()) >= 80


def _mean_colour(image: np.ndarray, rles) -> np.ndarray:
  mask = np.logical_or.reduce([mask_utils.decode({"size": [256, 256], "counts": r}) > 0
                               for r in rles])
  return image[mask].mean(0)


def test_entries_read_cleanly_and_words_fit_targets(small):
  rules = hmpl.TextRules(overlong="invalid", non_ascii="invalid")  # all ASCII, <= 32 tokens
  categories = {k.name: (k.category_id, k.part_category_id) for k in demo_data.KINDS}
  colour_checked = 0
  for subset in demo_data.SUBSETS:
    records = []
    for split in ("train", "val"):
      records += hmpl.read_hmpl_json(str(small / subset / f"sam3i_{split}.json"),
                                     str(small / "images"), check_images="decode",
                                     text_rules=rules)
    counts = [len(r.rles) for r in records]
    assert 0 in counts  # negatives
    if subset.endswith("1to1"):
      assert set(counts) == {0, 1}
    elif subset.endswith("1toN"):
      assert min(c for c in counts if c) >= 2
    assert {r.kind for r in records} == {"object", "part"}, subset
    for record in records:
      kind = record.concept[0].split()[0]
      is_part = " " in record.concept[0]
      assert record.queried_category == categories[kind][is_part]
      assert record.kind == ("part" if is_part else "object")  # "mug:handle" is a part
      assert set(record.category_ids.tolist()) <= {record.queried_category}
      named = [c for c in demo_data.COLOURS if c in record.simple[0].split()]
      if not record.rles or not named or is_part or kind == "house":
        continue  # parts are not in the object's colour, roofs are darker
      image = np.asarray(Image.open(small / "images" / record.file_name).convert("RGB"))
      colour = _mean_colour(image, record.rles)
      nearest = min(demo_data.COLOURS,
                    key=lambda c: np.abs(np.array(demo_data.COLOURS[c]) - colour).sum())
      assert nearest == named[0], (record.simple[0], colour)
      assert demo_data.COLOUR_RIDDLES[named[0]] in record.complex[0]
      colour_checked += 1
  assert colour_checked >= 10
