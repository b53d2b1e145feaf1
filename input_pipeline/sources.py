"""Random-access sources of `Record`s: an HMPL or COCO instances JSON file read directly, or the
ArrayRecord shards that the TFDS builder wrote. Both are picklable (grain's worker processes get a
copy).
"""

from __future__ import annotations

import dataclasses
import json
import os

from input_pipeline import coco
from input_pipeline import hmpl
from input_pipeline import instructpart
from input_pipeline import reasonseg

TFDS_BUILDER_NAME = "sam3i_instruct"
BUILD_REPORT_FILE = "build_report.json"


def tfds_config_name(dataset_name: str) -> str:
  """The TFDS builder config of a dataset: "HMPL-Instruct_1to1" -> "hmpl_instruct_1to1"."""
  return "".join(c if c.isalnum() else "_" for c in dataset_name.lower()).strip("_")


class JsonSource:
  """The records of one HMPL (`format="hmpl"`) or COCO instances (`"coco"`) JSON file, an
  InstructPart data JSON (`"instructpart"`; images and masks in `images/` and `masks/` beside it
  unless `image_root` says otherwise) or a ReasonSeg split folder (`"reasonseg"`, `json_path`
  the folder; its images are in it); each read fills in the image file's bytes.

  Indexing validates the whole file up front (`hmpl.read_hmpl_json`, `coco.read_coco_json` with
  `negatives` and `seed`, `instructpart.read_instructpart_json`,
  `reasonseg.read_reasonseg_folder`); what was skipped is in `report`. A file that disappears or
  cannot be read later gives a record with `image_error` set, which the transform treats as a
  corrupt image.
  """

  def __init__(self, json_path: str, image_root: str | None, *, format: str = "hmpl",
               bad_input: str = "error", check_images: str = "exists",
               text_rules: hmpl.TextRules | None = hmpl.TextRules(), negatives: float = 1.0,
               seed: int = 0):
    self.json_path, self.image_root = json_path, image_root
    self.report = hmpl.InputReport(bad_input)
    options = dict(check_images=check_images, text_rules=text_rules, report=self.report)
    if format == "hmpl":
      self.records = hmpl.read_hmpl_json(json_path, image_root, **options)
    elif format == "coco":
      self.records = coco.read_coco_json(json_path, image_root, negatives=negatives, seed=seed,
                                         **options)
    elif format == "instructpart":
      self.image_root = image_root or os.path.join(os.path.dirname(os.path.abspath(json_path)),
                                                   "images")
      self.records = instructpart.read_instructpart_json(json_path, self.image_root, **options)
    elif format == "reasonseg":
      self.image_root = json_path
      self.records = reasonseg.read_reasonseg_folder(json_path, **options)
    else:
      raise ValueError(f"unknown annotation format {format!r}; use 'hmpl', 'coco', "
                       "'instructpart' or 'reasonseg'")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> hmpl.Record:
    record = self.records[index]
    path = os.path.join(self.image_root, record.file_name)
    try:
      with open(path, "rb") as f:
        return dataclasses.replace(record, image=f.read())
    except OSError as e:
      return dataclasses.replace(record, image_error=f"image file {path} cannot be read ({e})")

  def concept_counts(self) -> list[int]:
    return [len(r.concept) for r in self.records]

  def __repr__(self) -> str:
    return f"JsonSource({self.json_path!r}, {len(self)} records)"


class TfdsSource:
  """The records of one split of a built `sam3i_instruct/<config>` dataset (ArrayRecord).

  Reads the newest version built in `data_dir` through the features stored with it, so shards of
  an older builder version stay readable whether or not the builder's code is imported (through
  the registered builder, TFDS would try to build the code's version instead). `report` holds
  what the builder skipped (its `build_report.json`), so training logs it too.
  """

  def __init__(self, config_name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds  # only for TFDS sources; never imports tensorflow here
    self.name = f"{TFDS_BUILDER_NAME}/{config_name}"
    config_dir = os.path.join(data_dir, TFDS_BUILDER_NAME, config_name)
    names = os.listdir(config_dir) if os.path.isdir(config_dir) else []
    versions = sorted(tfds.core.Version(v) for v in names if tfds.core.Version.is_valid(v))
    if not versions:
      raise FileNotFoundError(
          f"{self.name} is not built in {data_dir}; build it with `python -m "
          f"input_pipeline.build --dataset <name> ... --out {data_dir}`")
    builder = tfds.builder_from_directory(os.path.join(config_dir, str(versions[-1])))
    self.version = str(builder.info.version)
    self.source = builder.as_data_source(split=split)
    self.report = hmpl.InputReport("skip")
    report_path = os.path.join(builder.data_dir, BUILD_REPORT_FILE)
    if os.path.isfile(report_path):
      with open(report_path) as f:
        built = json.load(f).get(split, {})
      self.report.problems.update(built.get("problems", {}))
      self.report.notes.update(built.get("notes", {}))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> hmpl.Record:
    return hmpl.Record.from_features(self.source[index])

  def concept_counts(self) -> list[int]:
    return [len(self.source[i]["concept"]) for i in range(len(self.source))]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, version {self.version}, {len(self)} records)"
