"""Settings of the input pipeline: `default_config()` and the dataset mixtures."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# SAM3-I's training mixture (train/configs/sam3i/base.yaml): a torch ConcatDataset of these ten
# sets, in this order, each with multiplier 1 and shuffled together, so each set is sampled in
# proportion to its size (no weights are given). Images: COCO 2014 for the RefCOCO family and
# Ref-ZOM, COCO 2017 for HMPL-Instruct and MMR, ReasonSeg's own folder.
RELEASED_MIXTURE = (
    ("RefCOCOg", "coco2014"), ("gRefCOCO", "coco2014"), ("MMR", "coco2017"),
    ("RefCOCOplus", "coco2014"), ("RefCOCO", "coco2014"), ("Ref-ZOM", "coco2014"),
    ("HMPL-Instruct_1to1", "coco2017"), ("HMPL-Instruct_1toAll", "coco2017"),
    ("HMPL-Instruct_1toN", "coco2017"), ("ReasonSeg", "reasonseg"),
)
HMPL_SUBSETS = ("HMPL-Instruct_1to1", "HMPL-Instruct_1toN", "HMPL-Instruct_1toAll")
MIXTURES = ("released", "hmpl", "demo")
DATASET_KINDS = ("json", "tfds")
ANNOTATION_FORMATS = ("hmpl", "coco", "instructpart", "reasonseg")
# A JSON dataset's file per split when `files` does not name it: <data_root>/<name>/<this> (a
# pattern with "*" must match one file). InstructPart keeps one data_*.json per split folder,
# ReasonSeg a folder of JPEG + JSON pairs per split.
LAYOUT_FILES = {"hmpl": "sam3i_{split}.json", "coco": "instances_{split}.json",
                "instructpart": "{split}/data_*.json", "reasonseg": "{split}"}
# Formats whose images lie beside their annotations (the entry's `images` is not used).
IMAGES_BESIDE = ("instructpart", "reasonseg")


def layout_file(folder: str, fmt: str, split: str) -> str:
  """The path of a split's annotations under `folder` by LAYOUT_FILES (a "*" pattern must match
  exactly one file; otherwise the pattern itself is returned, for the reader to name)."""
  import glob
  import os
  path = os.path.join(folder, LAYOUT_FILES[fmt].format(split=split))
  if "*" not in path:
    return path
  matches = sorted(glob.glob(path))
  if len(matches) > 1:
    raise ValueError(f"{path} matches {len(matches)} files ({matches[:3]}...): name the split's "
                     "file in the dataset entry's `files`")
  return matches[0] if matches else path


def dataset_entry(name: str, images: str, kind: str = "tfds", weight: float | None = None, *,
                  format: str = "hmpl", files: dict[str, str] | None = None,
                  negatives: float = 1.0) -> ml_collections.ConfigDict:
  """One dataset of a mixture (see `default_config` for the fields)."""
  if kind not in DATASET_KINDS:
    raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
  if format not in ANNOTATION_FORMATS:
    raise ValueError(f"dataset format must be one of {ANNOTATION_FORMATS}, got {format!r}")
  return ml_collections.ConfigDict({
      "name": name, "kind": kind, "images": images, "format": format,
      "files": {"train": "", "val": "", **(files or {})}, "negatives": float(negatives),
      "weight": config_dict.placeholder(float) if weight is None else float(weight)})


def default_config(mixture: str = "released") -> ml_collections.ConfigDict:
  """The pipeline settings; `mixture` picks the dataset list.

  Mixtures: "released" (SAM3-I's ten training sets, read from TFDS ArrayRecord shards),
  "hmpl" (the three HMPL-Instruct subsets only), "demo" (the generated demo set of
  `input_pipeline.demo_data`, read from its JSON files; generated on first use).

  Fields:
    datasets: list of {name, kind, format, files, negatives, images, weight}. name: the
      dataset's folder under `data_root` and, as `sources.tfds_config_name(name)`, its TFDS
      builder config. kind: "json" (read the JSON file directly; fine for small sets) or "tfds"
      (shards built by `python -m input_pipeline.build` into `tfds_data_dir`). format: "hmpl"
      (SAM3-I's HMPL-Instruct JSON) or "coco" (COCO instances JSON: one datapoint per image and
      category, the name as the prompt, `input_pipeline.coco`; evaluation adds COCO AP).
      files: {split: JSON path} (JSON kind; "" = the layout `<data_root>/<name>/sam3i_<split>.json`
      or, for COCO, `instances_<split>.json`). negatives: COCO's share of absent categories
      prompted per training image (0 to 1; evaluation prompts all of them). images: a key of
      `image_roots` or a folder (JSON kind only; the shards hold the image bytes). weight:
      sampling weight; all None = concatenate and shuffle (each set in proportion to its size,
      as the reference does), else all must be set and each set is shuffled and repeated on its
      own and mixed with these weights.
    data_root, tfds_data_dir, image_roots: where the JSON files, the built shards and the
      image folders are (image_roots maps a source name to a folder).
    generate_demo: generate the demo set into `data_root` if it is missing or out of date.
    train_split, eval_split: the splits read for training and evaluation.
    batch_size, eval_batch_size: examples per batch on each host (process).
    max_targets: T, the fixed number of target slots (<= 200, the reference's limit); a training
      datapoint with more non-crowd targets is dropped (the reference drops such queries).
    seed: the one seed of shuffling, mixing and the per-example randomness (sizes, strings).
    shuffle: shuffle the training data (each epoch differently).
    num_epochs: training epochs (None = repeat forever; must be None with weights).
    train_sizes: the random square sizes (None = `transforms.train_sizes(img_size)`, i.e.
      480..992 step 32 at 1008).
    concept_choice: the training concept string: "random" (one of the list per example, like the
      reference's concept-only stage) or "first" (concept[0], what stage 3's anchor uses).
    expand_concepts: evaluation yields one sample per concept string of each datapoint.
    worker_count: grain worker processes (0 = transform in this process); changing it changes
      the order of batches, so a checkpoint resumes only with the same count.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads, read_buffer: threads and buffered elements per process for reading and
      transforming (grain ReadOptions; keep the buffer small: a 1008 px example with 200 masks
      is ~29 MB).
    bad_input: "error" (raise, naming the file and record) or "skip" (drop and count).
    check_images: what indexing a JSON source checks of each image: "exists", "decode", "none".
    overlong_instructions: "truncate" (tokenizer cuts to the context length, as the reference
      does; counted) or "invalid" (a bad input).
    non_ascii_instructions: "keep" (counted) or "invalid" (a bad input).
    vocab_path: the CLIP BPE vocabulary (None = `sam3i_jax.tokenizer.find_vocab`'s search).
  """
  if mixture not in MIXTURES:
    raise ValueError(f"unknown mixture {mixture!r}; choose from {MIXTURES}")
  config = ml_collections.ConfigDict()
  config.mixture = mixture
  config.data_root = ""
  config.tfds_data_dir = ""
  config.image_roots = ml_collections.ConfigDict({"coco2014": "", "coco2017": "", "reasonseg": ""})
  config.generate_demo = False
  if mixture == "released":
    config.datasets = [dataset_entry(name, images) for name, images in RELEASED_MIXTURE]
  elif mixture == "hmpl":
    config.datasets = [dataset_entry(name, "coco2017") for name in HMPL_SUBSETS]
  else:
    from input_pipeline import demo_data  # the path only; nothing is generated here
    config.data_root = str(demo_data.default_demo_dir())
    config.image_roots = ml_collections.ConfigDict({"demo": demo_data.IMAGE_FOLDER})
    config.generate_demo = True
    config.datasets = [dataset_entry(name, "demo", kind="json") for name in HMPL_SUBSETS]
  config.train_split = "train"
  config.eval_split = "val"
  config.batch_size = 32
  config.eval_batch_size = 8
  config.max_targets = 200
  config.seed = 123
  config.shuffle = True
  config.num_epochs = config_dict.placeholder(int)
  config.train_sizes = config_dict.placeholder(tuple)
  config.concept_choice = "random"
  config.expand_concepts = False
  config.worker_count = 0
  config.worker_buffer_size = 2
  config.read_threads = 1
  config.read_buffer = 4
  config.bad_input = "error"
  config.check_images = "exists"
  config.overlong_instructions = "truncate"
  config.non_ascii_instructions = "keep"
  config.vocab_path = config_dict.placeholder(str)
  return config
