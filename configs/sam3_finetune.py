"""Fine-tuning SAM 3 (or SAM 3.1) itself on a COCO instances dataset, with SAM 3's losses:

  python main.py --config=configs/sam3_finetune.py \\
      --config.init.checkpoint=converted/sam3 \\
      --config.coco.train=data/annotations/instances_train.json \\
      --config.coco.val=data/annotations/instances_val.json --config.coco.images=data/images \\
      [--config.train.freeze=vision,text] [--config.coco.negatives=0.5] \\
      [--config.stage_settings.stage0.epochs=20]

Each datapoint is an (image, category) pair prompted with the category's name
(`input_pipeline.coco`; `coco.negatives` of the categories absent from a training image are
prompted too, as negatives; evaluation prompts all of them). Training is the curriculum's stage 0
(every SAM 3 parameter, less `train.freeze`: names vision, text, geometry, fusion, decoder, heads
or regular expressions) with all of the main recipe's machinery, whose fields configs/hmpl.py
documents: the mesh and sharding, gradient accumulation, remat, exact resume, the NaN guard,
TensorBoard and the progress line. Evaluation reports COCO box and mask AP next to gIoU / cIoU.
Large sets: build ArrayRecord shards once (`python -m input_pipeline.build --format coco ...`) and
set `--config.coco.kind=tfds --config.data.tfds_data_dir=OUT` (the shards hold the images).

`arg`:
  (none)  the user's data (the `coco` fields), the full-size model in bf16 with remat, SAM 3's
          fine-tuning learning rates (8e-4 for the transformer and 5e-5 for the text encoder,
          times its lr_scale 0.1);
  demo    the demo set's COCO export (`input_pipeline.demo_data`) from the demo's tiny SAM 3
          (configs/hmpl.py's DEMO_SAM3_DIR) on CPU: evaluated before and after 300 steps.
"""

from __future__ import annotations

import ml_collections

import input_pipeline
from configs import hmpl

VARIANTS = ("default", "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config argument {arg!r}; variants: {VARIANTS}")
  config = hmpl.get_config("demo_sam3" if variant == "demo" else None)
  config.unlock()
  config.variant = f"sam3_finetune:{variant}"
  config.workdir = f"runs/sam3_finetune_{variant}"
  config.stages = (0,)
  # The user's COCO dataset; the pipeline's dataset entry refers to these fields.
  config.coco = ml_collections.ConfigDict({
      "name": "coco",  # the dataset's name in metrics and, for kind "tfds", its builder config
      # "json": read the files directly; "tfds": shards built by input_pipeline.build.
      "kind": "json",
      "train": "", "val": "",  # the instances JSON files (kind "json")
      "images": "",  # the folder that their file_name entries are relative to
      "negatives": 1.0,  # share of the absent categories prompted per training image
  })
  config.data = input_pipeline.default_config("released")
  entry = input_pipeline.dataset_entry("coco", "", kind="json", format="coco")
  for field in ("name", "kind", "images", "negatives"):
    entry[field] = config.coco.get_ref(field)
  for split in ("train", "val"):
    entry.files[split] = config.coco.get_ref(split)
  config.data.datasets = [entry]
  config.eval.levels = ("concept",)
  config.eval.before_training = True
  # SAM 3's fine-tuning LRs; warmup, cooldown and timescale (steps) are this config's choice.
  config.stage_settings.stage0 = hmpl.stage_config(lr=8e-5, text_lr=5e-6, warmup_steps=20,
                                                   cooldown_steps=20, timescale=20, epochs=20)
  config.train.update(global_batch=16, checkpoint_every=1000, log_every=20, eval_every=0)
  if variant == "demo":
    _demo(config)
  config.data.batch_size = config.train.global_batch
  config.data.seed = config.get_ref("seed")
  config.lock()
  return config


def _demo(config: ml_collections.ConfigDict) -> None:
  """The local run: the demo set's COCO export, the demo's tiny SAM 3, CPU-sized settings."""
  from input_pipeline import demo_data
  root = demo_data.default_demo_dir()
  config.init.checkpoint = hmpl.DEMO_SAM3_DIR
  config.coco.update(name="demo_coco", images=str(root / demo_data.IMAGE_FOLDER),
                     train=str(root / demo_data.COCO_FOLDER / "instances_train.json"),
                     val=str(root / demo_data.COCO_FOLDER / "instances_val.json"),
                     negatives=0.5)
  config.data.generate_demo = True
  config.data.data_root = str(root)
  config.data.max_targets = 8
  config.data.eval_batch_size = 8
  # Binary classification targets, as the demo's other runs (docs/training.md, "The demo"): with
  # SAM 3's IoU-aware ones the tiny model's scores sink under the 0.5 threshold in a short run.
  config.stage_settings.stage0.update(lr=3e-4, text_lr=1e-4, warmup_steps=10, cooldown_steps=50,
                                      timescale=2000, epochs=None, steps=300,
                                      binary_targets_from_step=0)
  config.train.update(global_batch=8, log_every=25, checkpoint_every=100, keep_checkpoints=2)
  config.eval.num_images = 4
