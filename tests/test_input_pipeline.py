"""grain pipelines on real files (the generated demo set): contract, determinism, resumption,
process sharding, mixing, eval padding, the TFDS/ArrayRecord path and the build CLI."""

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

import input_pipeline
from input_pipeline import demo_data
from input_pipeline import hmpl
from input_pipeline import transforms
from sam3i_jax import get_preset

MODEL = get_preset("tiny")  # S=224, M=64, L=32
SUBSETS = demo_data.SUBSETS


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  return demo_data.ensure_demo_data(tmp_path_factory.mktemp("demo"), num_train_images=24,
                                    num_val_images=8)


def _config(root, **changes):
  config = input_pipeline.default_config("demo")
  config.data_root = str(root)
  config.generate_demo = False  # the fixture's smaller set, not the default one
  config.batch_size = 4
  config.eval_batch_size = 4
  config.max_targets = 8
  config.read_threads = 0
  for key, value in changes.items():
    config[key] = value
  return config


def _ids(split, root, subsets=SUBSETS):
  ids = []
  for subset in subsets:
    with open(root / subset / f"sam3i_{split}.json") as f:
      ids += [e["id"] for e in json.load(f)["images"]]
  return ids


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_follow_the_contract(demo_root):
  pipeline = input_pipeline.train_pipeline(_config(demo_root), MODEL, process_index=0,
                                           process_count=1)
  assert pipeline.lengths == {s: len(_ids("train", demo_root, [s])) for s in SUBSETS}
  batch = next(pipeline.iterator())
  s, m, t, l = 224, 64, 8, 32
  expected = {
      "image": ((4, s, s, 3), np.float32), "tokens_concept": ((4, l), np.int32),
      "tokens_simple": ((4, l), np.int32), "tokens_complex": ((4, l), np.int32),
      "boxes": ((4, t, 4), np.float32), "target_valid": ((4, t), np.bool_),
      "masks": ((4, t, m, m), np.bool_), "concept_id": ((4,), np.int32),
      "datapoint_id": ((4,), np.int64), "image_id": ((4,), np.int64),
      "orig_size": ((4, 2), np.int32), "content_size": ((4, 2), np.int32),
      "example_valid": ((4,), np.bool_)}
  assert set(batch) == set(transforms.BATCH_KEYS) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch["example_valid"].all()
  assert (batch["orig_size"] == 256).all()
  assert set(batch["datapoint_id"]) <= set(_ids("train", demo_root))
  # masks and boxes of valid targets lie inside the content, nothing outside
  for b in range(4):
    c = batch["content_size"][b, 0] * m / s
    valid = batch["target_valid"][b]
    assert not batch["masks"][b][~valid].any()
    assert not batch["masks"][b][:, int(np.ceil(c)) + 1:].any()
    assert all(mask.any() for mask in batch["masks"][b][valid])
    assert (batch["boxes"][b][valid][:, :2] < batch["content_size"][b, 0] / s).all()


def test_seeded_determinism_and_exact_resumption(demo_root):
  config = _config(demo_root)
  first = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  iterator = first.iterator()
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  again = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  resumed = again.iterator()
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 3), expected):
    _assert_same(a, b)
  fresh = _take(again.iterator(), 6)[3:]
  for a, b in zip(fresh, expected):
    _assert_same(a, b)
  other = input_pipeline.train_pipeline(_config(demo_root, seed=7), MODEL, process_index=0,
                                        process_count=1)
  assert not np.array_equal(next(other.iterator())["datapoint_id"], fresh[0]["datapoint_id"])


def test_multiprocess_workers_resume_exactly(demo_root):
  config = _config(demo_root, worker_count=2, worker_buffer_size=1)
  pipeline = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  iterator = pipeline.iterator()
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  iterator.close()
  resumed = pipeline.iterator()
  resumed.set_state(state)
  try:
    for a, b in zip(_take(resumed, 2), expected):
      _assert_same(a, b)
  finally:
    resumed.close()


def test_process_shards_are_disjoint_blocks_of_the_global_batches(demo_root):
  """Per step, the host batches of 2 processes (2 examples each), concatenated in process order,
  are the 1-process run's batch of 4; together they cover the epoch but its incomplete last
  global batch."""
  config = _config(demo_root, num_epochs=1, batch_size=2, max_targets=16)
  hosts = [[b["datapoint_id"].tolist() for b in input_pipeline.train_pipeline(
      config, MODEL, process_index=index, process_count=2).iterator()] for index in range(2)]
  config.batch_size = 4
  single = [b["datapoint_id"].tolist() for b in input_pipeline.train_pipeline(
      config, MODEL, process_index=0, process_count=1).iterator()]
  assert len(hosts[0]) == len(hosts[1]) == len(single) > 10
  assert [first + second for first, second in zip(*hosts)] == single
  seen = sum(hosts[0] + hosts[1], [])
  assert len(set(seen)) == len(seen)
  expected = _ids("train", demo_root)
  assert set(seen) <= set(expected) and len(expected) - len(seen) < 4


def test_weighted_mixture_follows_the_weights(demo_root):
  config = _config(demo_root, batch_size=8, max_targets=16)
  for entry, weight in zip(config.datasets, (0.7, 0.1, 0.2)):
    entry.weight = weight
  pipeline = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  owner = {i: s for s in SUBSETS for i in _ids("train", demo_root, [s])}
  counts = collections.Counter(owner[int(i)] for b in _take(pipeline.iterator(), 10)
                               for i in b["datapoint_id"])
  assert counts[SUBSETS[0]] > 40 and counts[SUBSETS[1]] < 20 and counts[SUBSETS[2]] < 30
  config.datasets[1].weight = None
  with pytest.raises(ValueError, match="all None or all > 0"):
    input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)


def test_eval_covers_each_sample_once_with_padding_and_strings(demo_root):
  config = _config(demo_root, expand_concepts=True)
  expected = _ids("val", demo_root)
  seen = []
  for index in range(3):
    pipeline = input_pipeline.eval_pipeline(config, MODEL, process_index=index, process_count=3)
    batches = list(pipeline.iterator())
    assert len(batches) == pipeline.num_batches
    for batch in batches:
      device, host = input_pipeline.split_host_fields(batch)
      assert set(device) == set(transforms.BATCH_KEYS)
      texts = host[transforms.HOST_KEY]
      valid = batch["example_valid"]
      assert (batch["datapoint_id"][~valid] == -1).all()
      assert all(texts["simple"][k] for k in np.flatnonzero(valid))
      assert not any(texts["simple"][k] for k in np.flatnonzero(~valid))
      seen += [int(i) for i in batch["datapoint_id"][valid]]
  assert sorted(seen) == sorted(expected)  # one concept each in the demo set
  records = {}
  for subset in SUBSETS:
    with open(demo_root / subset / "sam3i_val.json") as f:
      records.update({e["id"]: e for e in json.load(f)["images"]})
  first = next(input_pipeline.eval_pipeline(config, MODEL, process_index=0,
                                            process_count=1).iterator())
  for k, datapoint in enumerate(first["datapoint_id"]):
    inst = records[int(datapoint)]["text_inst_input"]
    assert first[transforms.HOST_KEY]["simple"][k] == inst["simple_query"][0]
    assert first[transforms.HOST_KEY]["complex"][k] == inst["complex_query"][0]
    assert first[transforms.HOST_KEY]["concept"][k] == inst["concept"][0]


@pytest.fixture(scope="module")
def built(demo_root, tmp_path_factory):
  """The 1toN subset built by the CLI into ArrayRecord shards (the demo set has the release's
  manual-dir layout: <dir>/<dataset>/sam3i_<split>.json and <dir>/images)."""
  from input_pipeline import build
  out = tmp_path_factory.mktemp("tfds")
  assert build.main(["--dataset", SUBSETS[1], "--manual-dir", str(demo_root),
                     "--out", str(out)]) == 0
  return out


def test_tfds_shards_give_the_same_examples_as_json(demo_root, built):
  config = _config(demo_root, tfds_data_dir=str(built))
  config.datasets = [input_pipeline.dataset_entry(SUBSETS[1], "demo", kind="json")]
  from_json = list(input_pipeline.eval_pipeline(config, MODEL, process_index=0,
                                                process_count=1).iterator())
  config.datasets = [input_pipeline.dataset_entry(SUBSETS[1], "demo", kind="tfds")]
  from_tfds_pipeline = input_pipeline.eval_pipeline(config, MODEL, process_index=0,
                                                    process_count=1)
  from_tfds = list(from_tfds_pipeline.iterator())

  def by_id(batches):
    rows = {}
    for batch in batches:
      for k, datapoint in enumerate(batch["datapoint_id"]):
        if batch["example_valid"][k]:
          rows[int(datapoint)] = {key: batch[key][k] for key in transforms.BATCH_KEYS}
    return rows

  json_rows, tfds_rows = by_id(from_json), by_id(from_tfds)
  assert sorted(json_rows) == sorted(_ids("val", demo_root, [SUBSETS[1]]))
  assert json_rows.keys() == tfds_rows.keys()
  for datapoint in json_rows:
    _assert_same(json_rows[datapoint], tfds_rows[datapoint])
  train = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  assert train.lengths == {SUBSETS[1]: len(_ids("train", demo_root, [SUBSETS[1]]))}
  assert next(train.iterator())["image"].shape == (4, 224, 224, 3)


def test_coco_files_build_into_shards_that_read_like_the_json(demo_root, tmp_path):
  """A COCO dataset (the demo set's export) built by the CLI with --format coco: the val split
  prompts every category, train the share --negatives of the absent ones; both read through the
  pipeline's tfds kind as the COCO JSON reads through its json kind."""
  from input_pipeline import build, coco
  files = {split: str(demo_root / demo_data.COCO_FOLDER / f"instances_{split}.json")
           for split in ("train", "val")}
  config = _config(demo_root, tfds_data_dir=str(tmp_path))
  assert build.main(["--format", "coco", "--dataset", "demo_coco", "--json",
                     f"train={files['train']}", "--json", f"val={files['val']}", "--images",
                     str(demo_root / demo_data.IMAGE_FOLDER), "--negatives", "0.5", "--seed",
                     str(config.seed), "--out", str(tmp_path)]) == 0
  entry = dict(name="demo_coco", images="demo", format="coco", negatives=0.5)
  config.datasets = [input_pipeline.dataset_entry(kind="json", files=files, **entry)]
  from_json = input_pipeline.eval_pipeline(config, MODEL, process_index=0, process_count=1)
  json_batches = list(from_json.iterator())
  config.datasets = [input_pipeline.dataset_entry(kind="tfds", **entry)]
  from_tfds = input_pipeline.eval_pipeline(config, MODEL, process_index=0, process_count=1)
  categories = len(json.load(open(files["val"]))["categories"])
  assert from_json.lengths == from_tfds.lengths == {"demo_coco": 8 * categories}

  def by_id(batches):  # the shards hold the records in TFDS's shuffled order
    return {int(datapoint): ({k: batch[k][i] for k in transforms.BATCH_KEYS},
                             batch[transforms.HOST_KEY]["instances"][i])
            for batch in batches for i, datapoint in enumerate(batch["datapoint_id"])
            if batch["example_valid"][i]}

  json_rows, tfds_rows = by_id(json_batches), by_id(from_tfds.iterator())
  assert json_rows.keys() == tfds_rows.keys() and len(json_rows) == 8 * categories
  for datapoint, (arrays, instances) in json_rows.items():
    _assert_same(arrays, tfds_rows[datapoint][0])
    assert instances == tfds_rows[datapoint][1]
  train = coco.read_coco_json(files["train"], str(demo_root / demo_data.IMAGE_FOLDER),
                              negatives=0.5, seed=config.seed)
  assert input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1
                                       ).lengths == {"demo_coco": len(train)}
  assert 24 * categories / 2 < len(train) < 24 * categories


def _json_kinds(demo_root, subset, split):
  with open(demo_root / subset / f"sam3i_{split}.json") as f:
    data = json.load(f)
  names = {c["id"]: c["name"] for c in data["categories"]}
  return {e["id"]: "part" if ":" in names[e["queried_category"]] else "object"
          for e in data["images"]}


def test_tfds_records_keep_the_kind_and_old_versions_stay_readable(demo_root, built, tmp_path):
  import shutil
  from input_pipeline import sources, tfds_builder  # a registered builder must not get in the way
  config = sources.tfds_config_name(SUBSETS[1])
  version = str(tfds_builder.Sam3iInstruct.VERSION)
  for split in ("train", "val"):
    source = sources.TfdsSource(config, split, str(built))
    assert source.version == version
    kinds = {source[i].datapoint_id: source[i].kind for i in range(len(source))}
    assert kinds == _json_kinds(demo_root, SUBSETS[1], split)
  assert set(kinds.values()) == {"object", "part"}
  # A 1.0.0 dataset: the same shards with the features that version stored (no kind).
  current = built / tfds_builder.Sam3iInstruct.name / config / version
  old = tmp_path / tfds_builder.Sam3iInstruct.name / config / "1.0.0"
  shutil.copytree(current, old)
  features = json.loads((old / "features.json").read_text())
  del features["featuresDict"]["features"]["kind"]
  (old / "features.json").write_text(json.dumps(features))
  info = json.loads((old / "dataset_info.json").read_text())
  (old / "dataset_info.json").write_text(json.dumps({**info, "version": "1.0.0"}))
  source = sources.TfdsSource(config, "val", str(tmp_path))
  assert source.version == "1.0.0" and len(source) == len(kinds)
  assert {source[i].kind for i in range(len(source))} == {""}
  shutil.copytree(current, old.parent / version)
  assert sources.TfdsSource(config, "val", str(tmp_path)).version == version  # the newest


def test_builder_writes_nothing_on_error_and_reports_skips(demo_root, tmp_path, capsys):
  from input_pipeline import build, tfds_builder
  with open(demo_root / SUBSETS[0] / "sam3i_val.json") as f:
    data = json.load(f)
  data["annotations"][0]["segmentation"] = {"size": [256, 256], "counts": [5, 5]}
  bad_id = data["annotations"][0]["image_id"]
  data["images"][1]["file_name"] = "val/missing.jpg"
  (tmp_path / "bad.json").write_text(json.dumps(data))
  args = ["--dataset", "bad_set", "--json", f"val={tmp_path / 'bad.json'}",
          "--images", str(demo_root / "images"), "--out", str(tmp_path / "out")]
  assert build.main(args) == 1
  assert "malformed segmentation" in capsys.readouterr().err
  assert not list((tmp_path / "out").rglob("*.array_record*"))
  version = str(tfds_builder.Sam3iInstruct.VERSION)
  assert not list((tmp_path / "out").rglob(version))  # no dataset version directory at all
  assert build.main(args + ["--bad-input", "skip"]) == 0
  out = capsys.readouterr().out
  assert f"val: {len(data['images']) - 2} examples" in out
  assert "malformed_annotation=1" in out and "missing_image=1" in out
  from input_pipeline import sources
  source = sources.TfdsSource("bad_set", "val", str(tmp_path / "out"))
  assert source.report.problems == {"malformed_annotation": 1, "missing_image": 1}
  assert bad_id not in {source[i].datapoint_id for i in range(len(source))}


def test_importing_the_package_imports_no_tensorflow():
  code = ("import sys, input_pipeline; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'torch') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input_policy_is_applied_by_the_pipeline(demo_root, tmp_path):
  root = tmp_path / "set"
  subset = root / SUBSETS[0]
  subset.mkdir(parents=True)
  with open(demo_root / SUBSETS[0] / "sam3i_val.json") as f:
    data = json.load(f)
  data["images"][0]["text_inst_input"]["simple_query"] = []
  (subset / "sam3i_val.json").write_text(json.dumps(data))
  config = _config(root)
  config.image_roots = {"demo": str(demo_root / "images")}
  config.datasets = [input_pipeline.dataset_entry(SUBSETS[0], "demo", kind="json")]
  with pytest.raises(hmpl.BadInputError, match=r"sam3i_val.json: images\[0\]"):
    input_pipeline.eval_pipeline(config, MODEL, process_index=0, process_count=1)
  config.bad_input = "skip"
  pipeline = input_pipeline.eval_pipeline(config, MODEL, process_index=0, process_count=1)
  assert pipeline.report.problems == {"empty_instructions": 1}
  assert pipeline.lengths[SUBSETS[0]] == len(data["images"]) - 1


def test_datapoints_with_too_many_targets_are_dropped(demo_root):
  config = _config(demo_root, num_epochs=1, max_targets=1, batch_size=1)
  pipeline = input_pipeline.train_pipeline(config, MODEL, process_index=0, process_count=1)
  seen = [int(b["datapoint_id"][0]) for b in pipeline.iterator()]
  small = []
  for subset in SUBSETS:
    with open(demo_root / subset / "sam3i_train.json") as f:
      data = json.load(f)
    counts = collections.Counter(a["image_id"] for a in data["annotations"])
    small += [e["id"] for e in data["images"] if counts[e["id"]] <= 1]
  assert sorted(seen) == sorted(small) and len(small) < len(_ids("train", demo_root))
