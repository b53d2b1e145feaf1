"""TFDS builder `sam3i_instruct`: HMPL-format or COCO instances JSON + image folder -> ArrayRecord
shards.

One builder config per dataset (the ten of SAM3-I's mixture are predefined; any other name works
through `builder_config(name)`), one split per JSON file. A COCO file gives one record per (image,
category) (`input_pipeline.coco`): the "train" split prompts the share `negatives` of each image's
absent categories, every other split all of them (what COCO AP needs). Each example is one
`hmpl.Record`:
  image       the image file's original encoded bytes (decoded at training time; nothing is
              re-encoded, so pixels are exactly the source file's);
  rles        each annotation's mask as a compressed COCO RLE string (polygons and uncompressed
              RLE are converted once, here): a few hundred bytes per mask, decoded by pycocotools
              in microseconds, and the transform needs only the decoded mask;
  rle_sizes, boxes, iscrowd, category_ids, annotation_ids: per-annotation arrays;
  concept / simple / complex: the instruction lists; datapoint_id, image_id, file_name,
  height, width, queried_category, kind (the target kind, "object" / "part" / "" unknown, see
  `hmpl`), origin (JSON file and index, for messages).
Works without TensorFlow (tensorflow-datasets' array_record writer and numpy feature encoding;
`tfds.features.Image` would need TensorFlow, hence the raw bytes).

Bad input is checked before anything is written: the JSON is validated by `hmpl.read_hmpl_json`
and every image is decoded once. Under bad_input="error" the first problem raises and TFDS
deletes its incomplete directory, so no partial dataset is left; under "skip" the problems are
counted, printed, and stored as `build_report.json` in the dataset directory, written inside
TFDS's incomplete directory so it appears atomically with the shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import config as config_lib
from input_pipeline import hmpl
from input_pipeline import sources
from input_pipeline import transforms

SPLITS = ("train", "val")

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Nothing is downloaded. Either pass the files explicitly (what `python -m input_pipeline.build`
does): json_files={"train": ".../sam3i_train.json", "val": ".../sam3i_val.json"} and
image_root=<the folder that file_name entries are relative to>; or lay out the manual dir as
SAM3-I's release does and pass download_config=tfds.download.DownloadConfig(manual_dir=DIR):
  DIR/<dataset folder>/sam3i_train.json, DIR/<dataset folder>/sam3i_val.json
      (e.g. DIR/HMPL-Instruct_1to1/sam3i_train.json; a missing split is left out;
      COCO instances files: instances_train.json, instances_val.json)
  DIR/images/...   the images (COCO train2014/val2014 or train2017/val2017, ReasonSeg)
"""


@dataclasses.dataclass(eq=False)
class Sam3iConfig(tfds.core.BuilderConfig):
  """A dataset of the mixture; `folder` is its name in SAM3-I's layout."""

  folder: str = ""


def _new_config(dataset_name: str) -> Sam3iConfig:
  return Sam3iConfig(name=sources.tfds_config_name(dataset_name), folder=dataset_name,
                     description=f"{dataset_name} in the HMPL-Instruct JSON format")


_RELEASED_CONFIGS = {name: _new_config(name) for name, _ in config_lib.RELEASED_MIXTURE}


def builder_config(dataset_name: str) -> Sam3iConfig:
  """The config of a dataset: one of the predefined ones, else a new one of that name."""
  return _RELEASED_CONFIGS.get(dataset_name) or _new_config(dataset_name)


class Sam3iInstruct(tfds.core.GeneratorBasedBuilder):
  """Instruction segmentation datapoints (HMPL-Instruct format) as ArrayRecord shards."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
      "1.0.0": "First version.",
      "1.1.0": "Adds `kind`, the target kind (object / part) that evaluation groups by. 1.0.0 "
               "shards stay readable (their records have an unknown kind); rebuild them for "
               "the object / part metrics.",
      "1.2.0": "Adds `ignore`, the region excluded from the IoU (ReasonSeg's ignore polygons). "
               "Older shards stay readable (no ignore region).",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = list(_RELEASED_CONFIGS.values())

  def __init__(self, *, json_files: Mapping[str, str] | None = None,
               image_root: str | None = None, bad_input: str = "error",
               text_rules: hmpl.TextRules = hmpl.TextRules(), annotation_format: str = "hmpl",
               negatives: float = 1.0, seed: int = 0, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._json_files = dict(json_files) if json_files else None
    self._image_root = image_root
    self._bad_input = bad_input
    self._text_rules = text_rules
    self._format, self._negatives, self._seed = annotation_format, negatives, seed
    self.reports: dict[str, hmpl.InputReport] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    text_list = tfds.features.Sequence(tfds.features.Text())
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "datapoint_id": tfds.features.Scalar(np.int64),
        "image_id": tfds.features.Scalar(np.int64),
        "file_name": tfds.features.Text(),
        "origin": tfds.features.Text(),
        "height": tfds.features.Scalar(np.int32),
        "width": tfds.features.Scalar(np.int32),
        "queried_category": tfds.features.Scalar(np.int64),
        "kind": tfds.features.Text(),
        "ignore": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "concept": text_list,
        "simple": text_list,
        "complex": text_list,
        "rles": text_list,
        "rle_sizes": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "iscrowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "category_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "annotation_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }), homepage="https://github.com/debby-0527/SAM3-I")

  def _inputs(self, dl_manager: tfds.download.DownloadManager) -> tuple[dict[str, str], str]:
    beside = self._format in config_lib.IMAGES_BESIDE  # images found from the split's path
    if self._json_files is not None:
      if self._image_root is None and not beside:
        raise ValueError("image_root is required with json_files")
      return self._json_files, self._image_root
    manual = os.fspath(dl_manager.manual_dir)
    folder = os.path.join(manual, self.builder_config.folder)
    files = {s: config_lib.layout_file(folder, self._format, s) for s in SPLITS}
    files = {s: path for s, path in files.items() if os.path.exists(path)}
    if not files:
      layout = config_lib.LAYOUT_FILES[self._format]
      raise FileNotFoundError(f"no {layout.format(split='<split>')} in {folder}"
                              f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return files, None if beside else self._image_root or os.path.join(manual, "images")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files, image_root = self._inputs(dl_manager)
    return {split: self._generate_examples(split, path, image_root)
            for split, path in files.items()}

  def _generate_examples(self, split: str, json_path: str,
                         image_root: str) -> Iterator[tuple[int, dict[str, Any]]]:
    report = self.reports[split] = hmpl.InputReport(self._bad_input)
    source = sources.JsonSource(
        json_path, image_root, format=self._format, bad_input=self._bad_input,
        check_images="exists", text_rules=self._text_rules,
        negatives=self._negatives if split == "train" else 1.0, seed=self._seed)
    report.merge(source.report)
    for index in range(len(source)):
      record = source[index]
      try:
        transforms.decode_image(record)
      except hmpl.BadInputError as e:
        report.problem("corrupt_image", str(e))
        continue
      yield record.datapoint_id, record.to_features()

  def _download_and_prepare(self, dl_manager, **kwargs):
    result = super()._download_and_prepare(dl_manager, **kwargs)
    # self.data_dir is TFDS's incomplete directory here: the report lands with the shards.
    with open(os.path.join(self.data_dir, sources.BUILD_REPORT_FILE), "w") as f:
      json.dump({split: r.to_dict() for split, r in self.reports.items()}, f, indent=1)
    return result
