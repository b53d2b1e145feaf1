"""The training job of main.py: the stages of the config in order, with checkpoints, resume,
logging, a NaN guard and evaluation.

Layout of `workdir`:
  stage{N}/checkpoints/   orbax checkpoints (state, data iterator, meta), keep-N, atomic
  stage{N}/final/         the stage's final model as a converted directory (`load_pretrained`)
  stage{N}/predictions/   PNG overlays of evaluation predictions
  tensorboard/            TensorBoard event files (tensorboardX)
  metrics.jsonl           every logged step and evaluation, one JSON object a line
  metrics.json            the evaluation results per stage (and "initial": before training,
                          with `eval.before_training`)
  initial/predictions/    PNG overlays of that initial evaluation
A stage whose `final/` exists is complete and is skipped on restart; an interrupted stage resumes
from its latest checkpoint, data iterator included, and continues exactly as if uninterrupted.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import nnx

import input_pipeline
from sam3i_jax import curriculum, partition
from sam3i_jax.evaluation.evaluate import evaluate, format_table
from sam3i_jax.losses.alignment import AlignmentWeights
from sam3i_jax.losses.detection import LossWeights
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import Sam3Image, host_counted_rngs, seed_dropout_streams
from sam3i_jax.pretrained import load_pretrained, read_config, save_pretrained
from sam3i_jax.tokenizer import find_vocab
from sam3i_jax.train import config_checks
from sam3i_jax.train import optimizer as optimizer_lib
from sam3i_jax.train import sharding as sharding_lib
from sam3i_jax.train.checkpoints import Checkpoints, abstract_with_shardings
from sam3i_jax.train.step import StepConfig, Trainer

FINAL_DIR = "final"
INITIAL = "initial"  # results key (and folder) of the evaluation before any training


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN/Inf loss or gradient; nothing of that step was saved."""


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class MetricsLog:
  """metrics.jsonl and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if self.active:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, kind: str, stage: int, step: int, values: dict[str, float]) -> None:
    """kind: "train" or "eval"; TensorBoard tags are "<kind>/stage<N>/<name>"."""
    if not self.active:
      return
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"kind": kind, "stage": stage, "step": step, **values}) + "\n")
    for key, value in values.items():
      tag = key.replace("=", "_").replace("@", "_at_")  # TensorBoard's tag alphabet
      self.writer.add_scalar(f"{kind}/stage{stage}/{tag}", value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def numerics(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The Sam3Config fields that the training config sets on any model: compute dtype, remat."""
  return {name: config.model[name] for name in ("dtype", "remat", "layer_remat")}


def model_config(config: ml_collections.ConfigDict):
  """The model config: the init checkpoint's sizes, or the preset's (with the SAM3-I adapters).
  A checkpoint without the adapters starts only stages that train SAM 3's concept level alone
  (stage 0: fine-tuning SAM 3 itself)."""
  overrides = numerics(config)
  if config.init.checkpoint:
    loaded = read_config(config.init.checkpoint, **overrides)
    sam3i_stages = [s for s in config.stages if set(curriculum.get(s).levels) != {"concept"}]
    if not loaded.adapters and sam3i_stages:
      raise ValueError(f"{config.init.checkpoint} holds SAM 3 without the SAM3-I adapters, which "
                       f"stage(s) {sam3i_stages} train; convert sam3.pt with `python -m convert "
                       "sam3 --adapters ...` (identity adapters) to start them from it")
    return loaded
  return get_preset(config.model.preset, adapters=True, **overrides)


def initial_model(config: ml_collections.ConfigDict) -> nnx.Module:
  if config.init.checkpoint:
    _log(f"init: {config.init.checkpoint}")
    model_config(config)  # checks the directory holds the adapters the stages need
    return load_pretrained(config.init.checkpoint, **numerics(config))
  _log(f"init: random ({config.model.preset} preset, seed {config.seed})")
  return Sam3Image(model_config(config), rngs=host_counted_rngs(config.seed))


def enter_stage(model: nnx.Module, stage: int, previous: int | None, seed: int) -> None:
  """The state changes at the start of a stage: the stage's entry migration after `previous`
  (curriculum.Stage.entry), and every dropout stream restarted from (seed, stage), so a stage
  trains the same whether the previous one ran in this process or was loaded from its final
  directory on a restart."""
  seed_dropout_streams(model, jax.random.fold_in(jax.random.key(seed), stage))
  migration = curriculum.get(stage).migration(previous)
  if migration is not None:
    nnx.update(model, migration(nnx.state(model, nnx.Param)))


def stage_data_config(config: ml_collections.ConfigDict, stage: int,
                      batch_size: int) -> ml_collections.ConfigDict:
  settings = config.stage_settings[f"stage{stage}"]
  data = copy.deepcopy(config.data)
  data.unlock()
  if settings.datasets:
    data.datasets = [entry for entry in data.datasets if entry.name in settings.datasets]
  data.batch_size = batch_size
  data.update(dict(curriculum.get(stage).data))
  return data


def stage_steps(config: ml_collections.ConfigDict, stage: int, pipeline) -> int:
  settings = config.stage_settings[f"stage{stage}"]
  if settings.steps:
    return int(settings.steps)
  if settings.epochs:
    examples = sum(pipeline.lengths.values())
    return max(1, math.ceil(settings.epochs * examples / config.train.global_batch))
  raise ValueError(f"stage {stage}: set stage_settings.stage{stage}.steps or .epochs")


def _host_batch_size(config: ml_collections.ConfigDict) -> int:
  return config.train.global_batch // jax.process_count()  # a multiple: config_checks


def _finite(metrics: dict[str, Any]) -> bool:
  return all(np.isfinite(float(metrics[k])) for k in ("loss", "grad_norm", "param_norm"))


class StageTraining(NamedTuple):
  """What a stage's training step is built from."""
  tx: Any  # the optimizer: the stage's LR groups and schedule, weight decay, clipping
  wrt: Any  # the nnx filter of the trainable parameters (the curriculum's groups less freeze)
  step_config: Callable[[int], StepConfig]  # the step config in force from a given step on
  learning_rates: Callable[[Any], dict[str, Any]]  # optimizer step -> {LR group: rate}


def stage_training(config: ml_collections.ConfigDict, model: nnx.Module, stage: int,
                   num_steps: int) -> StageTraining:
  """The stage's optimizer (schedules over `num_steps`), trainable parameters and objective as the
  config and the curriculum give them; binary classification targets from
  `binary_targets_from_step` on. Used by the training loop and the benchmarks alike."""
  settings = config.stage_settings[f"stage{stage}"]
  group_lrs = {partition.DEFAULT: settings.lr, partition.TEXT_ADAPTERS: settings.text_lr}
  schedule = optimizer_lib.ScheduleConfig(settings.warmup_steps, settings.cooldown_steps,
                                          settings.timescale, num_steps)
  tx = optimizer_lib.make_optimizer(
      group_lrs, partition.lr_group, optimizer_lib.layer_norm_paths(model), schedule,
      weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
  binary_from = settings.binary_targets_from_step

  def step_config(step: int) -> StepConfig:
    return StepConfig.of_stage(stage, config.train.accum_steps,
                               detection=LossWeights(**config.loss.detection),
                               alignment_weights=AlignmentWeights(**config.loss.alignment),
                               num_replicas=config.train.loss_replicas,
                               pad_num_queries=config.train.loss_pad_queries or None,
                               iou_aware_targets=binary_from is None or step < binary_from)

  schedules = {name: optimizer_lib.inverse_sqrt_schedule(lr, schedule)
               for name, lr in group_lrs.items()}
  return StageTraining(tx, partition.trainable(stage, config.train.freeze), step_config,
                       lambda count: {k: s(count) for k, s in schedules.items()})


def train_stage(config, model, stage: int, mesh, log: MetricsLog, stage_dir: str
                ) -> tuple[nnx.Module | None, int]:
  """Trains one stage to its end (-> the model, eval mode, and the stage's step count) or until
  `stop_after_steps` (-> None and the step reached, after saving a checkpoint)."""
  settings = config.stage_settings[f"stage{stage}"]
  data_axes = sharding_lib.batch_axes(tuple(config.mesh.logical_rules))
  data = stage_data_config(config, stage, _host_batch_size(config))
  pipeline = input_pipeline.train_pipeline(data, model.config)
  _log(f"stage {stage}: data {pipeline.lengths}; {pipeline.report}")
  num_steps = stage_steps(config, stage, pipeline)
  partition.check_freeze(model, config.train.freeze)
  partition.summary(model, stage, print_fn=_log, freeze=config.train.freeze)
  binary_from = settings.binary_targets_from_step
  training = stage_training(config, model, stage, num_steps)
  step_config = training.step_config
  trainer = Trainer(model, training.tx, training.wrt, mesh, step_config(0),
                    learning_rates=training.learning_rates,
                    param_axes=tuple(config.mesh.param_axes),
                    rules=tuple(config.mesh.logical_rules))
  iterator = pipeline.iterator()
  # Leaving the block waits for the checkpoints begun in it, also when a step fails.
  with Checkpoints(os.path.join(stage_dir, "checkpoints"), keep=config.train.keep_checkpoints,
                   async_save=config.train.async_checkpoints) as checkpoints:
    step = saved = 0
    if checkpoints.latest_step() is not None:
      abstract = abstract_with_shardings(trainer.state, trainer.state_shardings)
      trainer.state, meta = checkpoints.restore(None, abstract, iterator)
      step = saved = int(meta["step"])
      _log(f"stage {stage}: resumed at step {step} from {checkpoints.directory}")
      trainer.set_config(step_config(step))

    start, start_step, last = time.time(), step, {}
    stop_at = step + config.train.stop_after_steps if config.train.stop_after_steps else num_steps
    while step < min(num_steps, stop_at):
      if step == binary_from:
        _log(f"stage {stage} step {step}: binary classification targets from here on")
        trainer.set_config(step_config(step))
      host_batch = next(iterator)
      batch = input_pipeline.make_global_batch(host_batch, mesh, data_axes)
      metrics = trainer.step(batch)
      step += 1
      if not _finite(metrics):
        ids = np.asarray(host_batch["datapoint_id"]).tolist()
        raise NonFiniteLossError(
            f"stage {stage} step {step}: loss {float(metrics['loss'])}, gradient norm "
            f"{float(metrics['grad_norm'])}, parameter norm {float(metrics['param_norm'])} "
            f"(datapoint ids {ids}); the last good checkpoint (step {saved}) in "
            f"{checkpoints.directory} is kept")
      if step % config.train.log_every == 0 or step == num_steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - start
        rate = (step - start_step) * config.train.global_batch / max(elapsed, 1e-9)
        eta = (num_steps - step) * config.train.global_batch / max(rate, 1e-9)
        log.write("train", stage, step, {**last, "examples_per_s": rate})
        lrs = " ".join(f"{k[3:]} {v:.2e}" for k, v in last.items() if k.startswith("lr/"))
        terms = " ".join(f"{k} {v:.3f}" for k, v in last.items()
                         if k.endswith("/loss") or k.startswith("align/"))
        _log(f"stage {stage} step {step}/{num_steps} loss {last['loss']:.3f} ({terms}) "
             f"lr {lrs} | {rate:.1f} ex/s, ETA {eta / 60:.1f} min")
      if step % config.train.checkpoint_every == 0 and step < num_steps:
        checkpoints.save(step, trainer.state, iterator, {"stage": stage})
        saved = step
      if config.train.eval_every and step % config.train.eval_every == 0 and step < num_steps:
        run_evaluation(config, trainer.model(), mesh, stage, step, log, stage_dir)
        trainer.model().train()
    if saved != step:
      checkpoints.save(step, trainer.state, iterator, {"stage": stage, **last})
    if step < num_steps:
      _log(f"stage {stage}: stopped at step {step}/{num_steps} (stop_after_steps); checkpoint in "
           f"{checkpoints.directory}; run again to resume")
      return None, step
    model = trainer.model()
    model.eval()
    return model, step


def run_evaluation(config, model, mesh, stage: int, step: int, log: MetricsLog,
                   stage_dir: str, what: str = "", all_levels: bool = False) -> dict:
  """Evaluates at the stage's evaluation levels (curriculum.Stage.eval_levels: the config's unless
  the stage says otherwise), or at the config's with `all_levels`."""
  pipeline = input_pipeline.eval_pipeline(config.data, model.config)
  batches = pipeline.iterator()
  limit = config.eval.max_batches or pipeline.num_batches
  data_axes = sharding_lib.batch_axes(tuple(config.mesh.logical_rules))
  levels = tuple(config.eval.levels)
  if not all_levels:
    levels = curriculum.get(stage).eval_levels or levels
  _log(f"stage {stage}: evaluating {what or 'the model'} at {levels} on {pipeline.lengths} "
       f"({limit} batches)")
  results = evaluate(
      model, (batch for _, batch in zip(range(limit), batches)), levels=levels,
      combine=config.eval.combine, threshold=config.eval.threshold,
      datasets=tuple(pipeline.lengths),
      to_device=lambda b: input_pipeline.make_global_batch(b, mesh, data_axes),
      from_device=lambda outputs: input_pipeline.host_local_batch(outputs, mesh, data_axes),
      image_dir=os.path.join(stage_dir, "predictions"), num_images=config.eval.num_images,
      ap_datasets=tuple(e.name for e in config.data.datasets if e.format == "coco"), log=_log)
  _log(format_table(results))
  log.write("eval", stage, step, {f"{group}/{k}": v for group, values in results.items()
                                  for k, v in values.items()})
  return results


def run(config: ml_collections.ConfigDict) -> dict:
  """Trains (or, in eval mode, evaluates) as the config says; returns the evaluation results."""
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(config.compilation_cache_dir))
    # Every program, the many small ones of eager model initialisation too (the tiny model's
    # first build takes 13 s on 2 cores, 2.5 s with them cached).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  mesh = sharding_lib.make_mesh(tuple(config.mesh.shape))
  config_checks.check(config, devices=jax.device_count(), processes=jax.process_count())
  _log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
       f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}; workdir {workdir}")
  log = MetricsLog(workdir)
  results_path = os.path.join(workdir, "metrics.json")
  results: dict[str, Any] = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  try:
    if config.mode == "eval":
      model = initial_model(config)
      results["eval"] = run_evaluation(config, model, mesh, max(config.stages), 0, log,
                                       os.path.join(workdir, "eval"))
      _write_results(results, results_path)
      _log(f"done: metrics in {results_path}")
      return results
    model, previous = None, None
    for stage in config.stages:
      stage_dir = os.path.join(workdir, f"stage{stage}")
      final = os.path.join(stage_dir, FINAL_DIR)
      if os.path.isdir(final):
        _log(f"stage {stage}: complete ({final}); skipped")
        model = load_pretrained(final, **numerics(config))
        previous = stage
        continue
      model = model if model is not None else initial_model(config)
      enter_stage(model, stage, previous, config.seed)
      if (config.eval.before_training and INITIAL not in results
          and not os.path.isdir(os.path.join(stage_dir, "checkpoints"))):
        results[INITIAL] = run_evaluation(config, model, mesh, stage, 0, log,
                                          os.path.join(workdir, INITIAL),
                                          what="the initial model (before any training)",
                                          all_levels=True)
        _write_results(results, results_path)
      model, step = train_stage(config, model, stage, mesh, log, stage_dir)
      if model is None:
        return results
      results[f"stage{stage}"] = run_evaluation(config, model, mesh, stage, step, log, stage_dir)
      save_pretrained(model, model.config, final, vocab_path=find_vocab(config.data.vocab_path),
                      report={"stage": stage})  # every process: orbax writes sharded arrays
      _write_results(results, results_path)
      previous = stage
  finally:
    log.close()
  _log(progress_table(results))
  _log(f"done: checkpoints and final models under {workdir}/stage*/, metrics in {results_path}, "
       f"prediction images in {workdir}/stage*/predictions/")
  return results


def _write_results(results: dict, path: str) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(results, f, indent=2)


def progress_table(results: dict, metric: str = "gIoU") -> str:
  """`metric` per level (rows) after each evaluated phase (columns: initial, stage0, ...)."""
  phases = [p for p in (INITIAL, *sorted(k for k in results if k.startswith("stage")))
            if p in results]
  levels = sorted({group.split("=", 1)[1] for p in phases for group in results[p]
                   if group.startswith("level=") and "/" not in group})
  lines = [f"{metric} by level after each phase", f"{'level':10s}" + "".join(
      f"{p:>10s}" for p in phases)]
  for level in levels:
    cells = [results[p].get(f"level={level}", {}).get(metric) for p in phases]
    lines.append(f"{level:10s}" + "".join(
        f"{c:10.2f}" if c is not None else f"{'-':>10s}" for c in cells))
  return "\n".join(lines)
