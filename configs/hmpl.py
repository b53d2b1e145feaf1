"""The main config: `python main.py --config=configs/hmpl.py[:arg]`, every field overridable with
`--config.<field>=<value>` (unknown fields are rejected).

`arg` is a comma-separated list of a variant and key=value settings:
  (none)     the released SAM3-I recipe: full-size model, bf16 compute, global batch 32, stage 1
             (`stage=2`, `stage=3` for the next stages), the released ten-set mixture;
  demo       SAM3-I's stages 1-3 on the generated demo set on CPU, starting (as the recipe starts
             from SAM 3) from the demo's own tiny SAM 3 in `DEMO_SAM3_DIR`; evaluated before
             training and after each stage;
  demo_sam3  stage 0, which made that tiny SAM 3: trained from scratch on the demo set's concept
             prompts (~50 min on 2 CPU cores; only the demo needs it, see docs/design.md §6);
  smoke      stages 0-3 from a random tiny model, a few steps each (tests and quick checks);
  eval       evaluation only of `init.checkpoint` (or the workdir's latest checkpoint).
e.g. `configs/hmpl.py:stage=2`, `configs/hmpl.py:demo`, `configs/hmpl.py:eval,stage=3`.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

import input_pipeline
from sam3i_jax.losses.alignment import AlignmentWeights
from sam3i_jax.losses.detection import LossWeights
from sam3i_jax.train import sharding

VARIANTS = ("default", "demo", "demo_sam3", "smoke", "eval")
DEMO_VARIANTS = ("demo", "demo_sam3", "smoke")
# The demo's tiny SAM 3: the final model of `python main.py --config=configs/hmpl.py:demo_sam3`
# (runs/demo_sam3/stage0/final), kept in the repository so that `make demo` takes minutes.
DEMO_SAM3_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "assets", "demo_sam3_tiny")

# Per-stage optimisation of the released recipe (base.yaml, sam3i_3_all.yaml): LR of the default
# group (encoder/decoder adapters, mask predictors, projection head) and of the text-encoder
# group, the inverse-sqrt scheduler's warmup/cooldown (steps), and epochs over the mixture.
RELEASED_STAGES = {
    1: dict(lr=1.024e-2, text_lr=6.4e-4, warmup_steps=3, cooldown_steps=3, epochs=8),
    2: dict(lr=1.024e-2, text_lr=6.4e-4, warmup_steps=3, cooldown_steps=3, epochs=8),
    3: dict(lr=2.56e-3, text_lr=1.6e-4, warmup_steps=1, cooldown_steps=1, epochs=4),
}
# The demo's runs: a near-constant LR (a long inverse-sqrt timescale) between a warmup and a
# cooldown, binary classification targets (docs/training.md, "The demo", says why); stage 0 trains
# SAM 3 itself from scratch on the concept prompts of the 1toAll set (the only entries whose
# concept names exactly the targets).
DEMO_STAGES = {
    0: dict(lr=3e-4, text_lr=3e-4, warmup_steps=30, cooldown_steps=300, timescale=2000,
            datasets=("HMPL-Instruct_1toAll",), binary_targets_from_step=2000),
    1: dict(lr=3e-3, text_lr=1e-3, warmup_steps=10, cooldown_steps=50, timescale=2000,
            binary_targets_from_step=0),
    2: dict(lr=3e-3, text_lr=1e-3, warmup_steps=10, cooldown_steps=50, timescale=2000,
            binary_targets_from_step=0),
    3: dict(lr=1e-3, text_lr=3e-4, warmup_steps=10, cooldown_steps=30, timescale=2000,
            binary_targets_from_step=0),
}


def stage_config(lr, text_lr, warmup_steps, cooldown_steps, timescale=3, epochs=None, steps=None,
                 datasets=None, binary_targets_from_step=None) -> ml_collections.ConfigDict:
  """One stage's optimisation and data settings (`config.stage_settings.stage<N>`)."""
  return ml_collections.ConfigDict({
      "lr": lr, "text_lr": text_lr, "warmup_steps": warmup_steps,
      "cooldown_steps": cooldown_steps, "timescale": timescale,
      "epochs": config_dict.placeholder(int) if epochs is None else epochs,
      "steps": config_dict.placeholder(int) if steps is None else steps,
      # Restrict this stage's training data to some of the mixture's datasets (by name).
      "datasets": config_dict.placeholder(tuple) if datasets is None else datasets,
      # From this step on, the classification loss targets 1 for matched queries instead of
      # SAM 3's IoU-aware target (`detection_loss(iou_aware_targets=False)`); None: never.
      "binary_targets_from_step": config_dict.placeholder(int)
      if binary_targets_from_step is None else binary_targets_from_step})


def _parse(arg: str | None) -> tuple[str, dict[str, str]]:
  variant, settings = "default", {}
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if eq:
      settings[key] = value
    elif part in VARIANTS:
      variant = part
    else:
      raise ValueError(f"unknown config argument {part!r}; variants: {VARIANTS}, or key=value")
  unknown = sorted(set(settings) - {"stage"})
  if unknown:
    raise ValueError(f"unknown config settings {unknown}; only stage=N is read from the arg")
  return variant, settings


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, settings = _parse(arg)
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.mode = "eval" if variant == "eval" else "train"
  config.workdir = "runs/hmpl"
  # The one seed: model initialisation, dropout streams and the input pipeline (shuffling, mixing,
  # per-example randomness); `data.seed` is the same field.
  config.seed = 123
  # A persistent XLA compilation cache (empty: off): reruns and resumed jobs skip compiling.
  config.compilation_cache_dir = ""

  config.model = ml_collections.ConfigDict({
      "preset": "full",
      "dtype": "bfloat16",
      # Rematerialise the ViT / text-encoder blocks in the backward pass: "none", "full"
      # (nothing saved), "dots" (matmul outputs saved); sam3i_jax.models.layers.REMAT_POLICIES.
      "remat": "full",
      # The same for the fusion-encoder and decoder layers (their 5184-token attention).
      "layer_remat": "full",
  })
  # A converted SAM 3 or SAM3-I directory (`python -m convert ...`) to start from; empty: random
  # init (only sensible for the demo's stage 0).
  config.init = ml_collections.ConfigDict({"checkpoint": ""})

  # The stages run in order, each starting from the previous one's final state after the stage's
  # entry migration (sam3i_jax.curriculum).
  config.stages = (int(settings.get("stage", 1)),)
  config.stage_settings = ml_collections.ConfigDict(
      {f"stage{stage}": stage_config(**values) for stage, values in RELEASED_STAGES.items()})

  config.optim = ml_collections.ConfigDict({"weight_decay": 0.1, "clip_norm": 0.1})
  # Weights of the loss terms (SAM3-I's base.yaml and sam3i_3_all.yaml): SAM 3's detection terms
  # on every branch, and the stage-3 alignment terms with their hyper-parameters.
  config.loss = ml_collections.ConfigDict({
      "detection": dataclasses.asdict(LossWeights()),
      "alignment": dataclasses.asdict(AlignmentWeights()),
  })

  config.train = ml_collections.ConfigDict({
      "global_batch": 32,
      "accum_steps": 1,
      # The reference normalises each GPU's loss by its own batch (2 prompts on each of 16 GPUs
      # in the paper's setting); the loss reproduces that for this many replicas, independent
      # of the mesh.
      "loss_replicas": 16,
      # loss_ce's normaliser: B * max(Q, this) as released; 0 = B * Q.
      "loss_pad_queries": 200,
      "log_every": 50,
      "checkpoint_every": 2000,
      "keep_checkpoints": 3,
      # Write checkpoints in the background while training goes on (orbax's async save; a
      # checkpoint becomes visible only once complete, so a crash mid-write leaves the last one).
      "async_checkpoints": True,
      "eval_every": 0,  # steps; 0 = at each stage's end
      # Stop this run after this many steps (a checkpoint is saved; running again resumes),
      # e.g. to fit a job's time limit; 0 = run the stages to the end.
      "stop_after_steps": 0,
      # Parameters frozen on top of what the stages train: names of SAM 3's parts (vision, text,
      # geometry, fusion, decoder, heads) or regular expressions over dotted parameter paths,
      # comma-separated (sam3i_jax.partition.FREEZE_GROUPS), e.g. "vision,text".
      "freeze": "",
  })

  config.mesh = ml_collections.ConfigDict({
      "shape": (-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
      "param_axes": sharding.PARAM_AXES,
      "logical_rules": sharding.LOGICAL_RULES,
  })

  config.eval = ml_collections.ConfigDict({
      "levels": ("concept", "simple", "complex"),
      "combine": "union",  # "top1" for RefCOCO-style single-target sets
      "threshold": 0.5,
      "max_batches": config_dict.placeholder(int),
      "num_images": 8,  # prediction PNGs written per level
      # Also evaluate the model before the first stage trains, at every level, so that the gains
      # of training are measured in one run.
      "before_training": False,
  })

  config.data = input_pipeline.default_config("released")
  if variant in DEMO_VARIANTS:
    _local_run(config, variant)
  config.data.batch_size = config.train.global_batch  # per host; main.py divides by hosts
  config.data.seed = config.get_ref("seed")
  config.lock()
  return config


def _local_run(config: ml_collections.ConfigDict, variant: str) -> None:
  """The local runs' overrides of the released recipe, all here: the tiny model on CPU, on the
  generated demo set (demo, demo_sam3, smoke)."""
  config.workdir = f"runs/{variant}"
  config.compilation_cache_dir = "runs/jax_cache"
  config.model.update(preset="tiny", dtype="float32", remat="none", layer_remat="none")
  config.stages = {"demo": (1, 2, 3), "demo_sam3": (0,), "smoke": (0, 1, 2, 3)}[variant]
  steps = {0: 4, 1: 3, 2: 3, 3: 3} if variant == "smoke" else {0: 3000, 1: 250, 2: 250, 3: 150}
  config.stage_settings = ml_collections.ConfigDict(
      {f"stage{stage}": stage_config(**values, steps=steps[stage])
       for stage, values in DEMO_STAGES.items()})
  # loss_ce normalised by B * Q: the demo's 16 queries learn their scores at a useful rate.
  config.train.update(global_batch=8, loss_replicas=1, loss_pad_queries=0, log_every=25,
                      checkpoint_every=500, keep_checkpoints=2,
                      eval_every=500 if variant == "demo_sam3" else 0)
  config.data = input_pipeline.default_config("demo")
  config.data.max_targets = 8
  config.data.eval_batch_size = 8
  if variant == "demo":
    # As the recipe starts from SAM 3: the demo's own tiny SAM 3, evaluated before training too.
    config.init.checkpoint = DEMO_SAM3_DIR
    config.eval.before_training = True
  if variant == "smoke":
    config.eval.max_batches = 2
