"""Training-step cost: CPU throughput of small models, and the full-size step's memory per device.

  python benchmarks/train_step.py [--throughput demo:0,1,3 mid:1,3] [--targets 8 200]
                                  [--steps 5] [--warmup 2]
                                  [--meshes 1,8,1 2,4,1] [--global-batches 8 16]
                                  [--memory-preset full] [--memory-stage 3]
                                  [--output benchmarks/results/train_step.json]

Throughput, on one CPU device (the host's cores), each run in its own process: the step of
`sam3i_jax.train.step.Trainer` as `main.py` builds it (the stage's trainable parameters, the
released AdamW groups with clipping, the demo config's LRs and per-replica loss normalisation) on
real demo batches from the input pipeline (generated demo set, random square resize, T target
slots, each run at every `--targets` T). The batches are read and placed before timing.
Reported: trace + lower time, compile time, the first step, the median of the timed steps after
`--warmup` steps (steps/s, examples/s), the median time of the step's matching alone (both
matchers, every branch, on one forward pass's outputs), the batch's largest valid target counts
and the host-to-device bytes per example by field. A (model, stage, T) not run keeps its
earlier record in the output file. Models:
  demo  the demo config: tiny preset with adapters (16 queries), float32, global batch 8;
  mid   MID_SIZES below: the full model's fusion encoder, decoder, heads and adapters, a ViT and
        text encoder at half width and fewer layers, 448 px; same training settings as the demo.

Memory, on a simulated 8-device CPU mesh (XLA_FLAGS=--xla_force_host_platform_device_count=8, in
a subprocess): the released recipe's step (configs/hmpl.py, bf16 compute, remat "full", T = 200,
the stage's losses) for each (data, fsdp, tensor) mesh and global batch, lowered and compiled on
abstract state and batch (ShapeDtypeStructs with their shardings; the model comes from
`abstract_model` and the optimizer from `nnx.eval_shape`, so nothing is materialised), with the
state donated as in training. Reported per device: XLA's `memory_analysis()` (argument, output,
alias, temp; total = argument + output - alias + temp), the parameter and optimizer-state bytes
that the shardings imply, and the compile time. XLA's CPU backend decides fusion and buffer
layout, so the figures indicate, not equal, what a TPU or GPU compile of the same step needs.

Prints two tables and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# The mid-size model: `get_preset("full", adapters=True, **MID_SIZES)`. 448 px gives a 32 x 32
# token grid (2 x 2 windows of 16, masks 128 x 128).
MID_SIZES = dict(img_size=448, pretrain_img_size=224, vit_dim=512, vit_depth=8, vit_heads=8,
                 window_size=16, global_att_blocks=(3, 7), text_width=512, text_heads=8,
                 text_layers=12)
MESH_DEVICES = 8
# Global batch of the throughput runs. The mid model's step at batch 8 needs 14 GB (stage 1) and
# 26 GB (stage 3) of XLA temp memory on CPU, mostly the fusion encoder's attention logits,
# weights and dropout masks ((B, 8, 1024, 1024) per layer, kept for the backward pass).
THROUGHPUT_BATCH = {"demo": 8, "mid": 2}
SCHEDULE_STEPS = 1000  # the LR schedule's length where the config derives it from epochs
# XLA options that skip LLVM's expensive optimisations (as tests/train_sharded_check.py): the
# HLO passes and buffer assignment, hence memory_analysis(), are unchanged.
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _model_config(name: str, train_config):
  from sam3i_jax.models.config import get_preset
  from sam3i_jax.train import loop
  config = loop.model_config(train_config)
  if name == "mid":
    return get_preset("full", adapters=True, dtype=config.dtype, remat=config.remat,
                      layer_remat=config.layer_remat, **MID_SIZES)
  if name != "demo":
    raise ValueError(f"unknown model {name!r}; demo or mid")
  return config


def _stage_training(train_config, model, stage: int):
  """The stage's optimizer, trainable parameters and objective as the training loop builds them."""
  from sam3i_jax.train import loop
  settings = train_config.stage_settings[f"stage{stage}"]
  return loop.stage_training(train_config, model, stage, settings.steps or SCHEDULE_STEPS)


def memory_stats(compiled) -> dict[str, int]:
  """XLA's buffer sizes of one device's program, and their total."""
  analysis = compiled.memory_analysis()
  stats = {name.removesuffix("_size_in_bytes").removesuffix("_in_bytes"): int(getattr(analysis, name))
           for name in dir(analysis) if name.endswith("_in_bytes")}
  stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
  return stats


def flops(compiled) -> float | None:
  """The compiler's FLOP count of one device's program (None where the backend gives none).
  XLA's cost analysis counts the body of a while loop once, so a program with scanned layers
  reports a lower bound (one layer of each stack), not the step's FLOPs."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _parameter_counts(model, stage: int) -> dict[str, int]:
  from sam3i_jax import partition
  counts = partition.counts(model, stage)
  return {"total": counts["total"], "trainable": counts["total"] - counts[partition.FROZEN]}


def _matching_s(model, batch, step_config, repeats: int) -> float:
  """Median seconds of the step's matching alone (both matchers, every branch of every level the
  stage trains), jitted, on the outputs of one training-mode forward pass of `batch`."""
  import jax
  from flax import nnx

  from sam3i_jax.losses.detection import branch_assignments
  from sam3i_jax.train.step import forward

  levels = step_config.objective.levels
  model.train()  # the outputs of every decoder layer and the one-to-many queries, as in training
  outputs = nnx.jit(lambda m, b: forward(m, b, step_config.stage))(model, batch)
  outputs = {level: outputs[level] for level in levels}
  match = jax.jit(lambda outs, boxes, valid: [branch_assignments(outs[level], boxes, valid)
                                              for level in levels])
  wall_ms, _ = common.median_call_ms(
    match, (outputs, batch["boxes"], batch["target_valid"]), repeats)
  return wall_ms / 1e3


def worker_throughput(model_name: str, stage: int, global_batch: int, steps: int,
                      warmup: int, max_targets: int) -> dict:
  import jax
  import numpy as np

  import input_pipeline
  from configs import hmpl
  from sam3i_jax.models.sam3 import Sam3Image, host_counted_rngs
  from sam3i_jax.train import loop, sharding
  from sam3i_jax.train.step import Trainer

  train_config = hmpl.get_config("demo")
  model_config = _model_config(model_name, train_config)
  model = Sam3Image(model_config, rngs=host_counted_rngs(train_config.seed))
  parameters = _parameter_counts(model, stage)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  training = _stage_training(train_config, model, stage)
  trainer = Trainer(model, training.tx, training.wrt, mesh, training.step_config(0),
                    learning_rates=training.learning_rates)

  train_config.train.global_batch = global_batch
  data = loop.stage_data_config(train_config, stage, global_batch)
  data.max_targets = max_targets
  iterator = input_pipeline.train_pipeline(data, model_config, process_index=0,
                                           process_count=1).iterator()
  host_batches = [next(iterator) for _ in range(warmup + steps)]
  # what travels host -> device per example, by field (the padded mask targets dominate)
  bytes_per_example = {key: int(np.asarray(value).nbytes) // global_batch
                       for key, value in host_batches[0].items()
                       if isinstance(value, np.ndarray) and value.dtype != object}
  valid_targets = [int(b["target_valid"].sum(-1).max()) for b in host_batches]
  batches = [input_pipeline.make_global_batch(b, mesh, sharding.batch_axes())
             for b in host_batches]

  start = time.perf_counter()
  lowered = trainer.lower(batches[0])
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  times, losses = [], []
  for batch in batches:
    start = time.perf_counter()
    trainer.state, metrics = compiled(trainer.state, batch)
    jax.block_until_ready((trainer.state, metrics))
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss in {losses}")
  step_s = statistics.median(times[warmup:])
  batch_size, targets = batches[0]["target_valid"].shape
  matching_s = _matching_s(trainer.model(), batches[0], training.step_config(0), max(steps, 3))
  return {
      "model": model_name, "stage": stage, "img_size": model_config.img_size,
      "dtype": model_config.dtype, "remat": model_config.remat, "parameters": parameters,
      "global_batch": batch_size, "max_targets": targets, "data": "demo set via input_pipeline",
      "lower_s": lower_s, "compile_s": compile_s, "first_step_s": times[0],
      "step_s": times[warmup:], "median_step_s": step_s, "steps_per_s": 1 / step_s,
      "examples_per_s": batch_size / step_s, "losses": losses,
      "matching_s": matching_s, "most_valid_targets_per_batch": valid_targets,
      "bytes_per_example": {**bytes_per_example, "total": sum(bytes_per_example.values())},
      "memory": memory_stats(compiled), "device": str(jax.devices()[0].device_kind),
      "peak_rss_gb": common.peak_rss_gb(),
  }


def _abstract_batch(model_config, global_batch: int, max_targets: int, mesh) -> dict:
  """ShapeDtypeStructs of a global batch of the batch contract, split over the batch axes."""
  import jax
  import numpy as np

  from input_pipeline import transforms
  from sam3i_jax.train import sharding
  spec = transforms.ExampleSpec.from_model_config(model_config, max_targets)
  batch = {}
  for key, value in transforms.padding_example(spec).items():
    value = np.asarray(value)
    dtype = np.int32 if value.dtype == np.int64 else value.dtype  # as make_global_batch (no x64)
    batch[key] = jax.ShapeDtypeStruct((global_batch, *value.shape), dtype,
                                      sharding=sharding.batch_sharding(mesh, value.ndim + 1))
  return batch


def _bytes_per_device(tree, shardings) -> int:
  """Bytes of device 0's shards of `tree` (every split here is even, so each device holds the
  same)."""
  import jax
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def worker_memory(preset: str, stage: int, mesh_shape: tuple[int, ...], global_batch: int,
                  max_targets: int | None, fast_compile: bool, devices=None) -> dict:
  """The released recipe's step of `stage` compiled on abstract sharded state for a mesh of
  `devices` (default: this process's; e.g. a TPU topology's for a deviceless compile)."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from configs import hmpl
  from sam3i_jax.models.config import get_preset
  from sam3i_jax.models.sam3 import abstract_model
  from sam3i_jax.models.layers import compile_target
  from sam3i_jax.train import loop, sharding
  from sam3i_jax.train.checkpoints import abstract_with_shardings
  from sam3i_jax.train.sharding import state_shardings
  from sam3i_jax.train.step import batch_shardings, make_step_fn

  train_config = hmpl.get_config(f"stage={stage}")
  # The released loss normalises per replica of (global batch / loss_replicas) examples; keep
  # that replica size at this global batch.
  per_replica = train_config.train.global_batch // train_config.train.loss_replicas
  train_config.train.loss_replicas = max(1, global_batch // per_replica)
  train_config.train.global_batch = global_batch
  max_targets = max_targets or train_config.data.max_targets
  model_config = get_preset(preset, adapters=True, **loop.numerics(train_config))
  start = time.perf_counter()
  model = abstract_model(model_config)
  model.train()
  training = _stage_training(train_config, model, stage)
  optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, training.tx, wrt=training.wrt), model)
  graphdef, state = nnx.split((model, optimizer))
  build_s = time.perf_counter() - start

  mesh = sharding.make_mesh(mesh_shape, devices)
  shardings = state_shardings(state, mesh)
  abstract_state = abstract_with_shardings(state, shardings)
  batch = _abstract_batch(model_config, global_batch, max_targets, mesh)
  model_state, optimizer_state = nnx.state(model), nnx.state(optimizer)
  params = nnx.state(model, nnx.Param)
  state_bytes = {
      "parameters": _bytes_per_device(params, state_shardings(params, mesh)),
      "model_state": _bytes_per_device(model_state, state_shardings(model_state, mesh)),
      "optimizer_state": _bytes_per_device(optimizer_state,
                                           state_shardings(optimizer_state, mesh)),
      "batch": _bytes_per_device(batch, batch_shardings(batch, mesh)),
  }
  step = jax.jit(make_step_fn(graphdef, training.wrt, training.step_config(0),
                              training.learning_rates),
                 in_shardings=(shardings, batch_shardings(batch, mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                 donate_argnums=0, compiler_options=FAST_COMPILE if fast_compile else None)
  start = time.perf_counter()
  with compile_target(mesh.devices.flat[0].platform):  # attention "auto" as on those devices
    lowered = step.lower(abstract_state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {
      "preset": preset, "stage": stage, "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)),
      "devices": mesh.size, "global_batch": global_batch,
      "examples_per_device": global_batch / mesh.size, "max_targets": max_targets,
      "img_size": model_config.img_size, "dtype": model_config.dtype, "remat": model_config.remat,
      "layer_remat": model_config.layer_remat, "parameters": _parameter_counts(model, stage),
      "bytes_per_device": state_bytes,
      "memory_per_device": memory_stats(compiled),
      "flops_per_device": flops(compiled),
      "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s,
      "compiler_options": FAST_COMPILE if fast_compile else {}, "peak_rss_gb": common.peak_rss_gb(),
  }


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f}"


def _optional(value: float | None, spec: str, scale: float = 1.0) -> str:
  """`value * scale` formatted, or "-" right-aligned for a record made before the field."""
  width = int(spec.split(".")[0])
  return "-".rjust(width) if value is None else format(value * scale, spec)


def _print_throughput(runs: list[dict]) -> None:
  print("\nThroughput, 1 CPU device (median step after warm-up)")
  print(f"{'model':6s} {'stage':>5s} {'params M':>9s} {'train M':>8s} {'batch':>5s} {'T':>3s} "
        f"{'lower s':>8s} {'compile s':>9s} {'step s':>7s} {'match s':>7s} {'ex/s':>6s} "
        f"{'MB/ex':>6s} {'RSS GB':>7s}")
  for r in runs:
    if "error" in r:
      print(f"{r['model']:6s} {r['stage']:5d} T={r.get('max_targets')} failed: "
            f"{r['error'].splitlines()[0]}")
      continue
    p = r["parameters"]
    print(f"{r['model']:6s} {r['stage']:5d} {p['total'] / 1e6:9.2f} {p['trainable'] / 1e6:8.2f} "
          f"{r['global_batch']:5d} {r['max_targets']:3d} {r['lower_s']:8.1f} {r['compile_s']:9.1f} "
          f"{r['median_step_s']:7.2f} {_optional(r.get('matching_s'), '7.3f')} "
          f"{r['examples_per_s']:6.2f} "
          f"{_optional(r.get('bytes_per_example', {}).get('total', None), '6.2f', 1e-6)} "
          f"{r['peak_rss_gb']:7.2f}")


def _print_memory(runs: list[dict]) -> None:
  print(f"\nStage-step memory per device (GB), simulated {MESH_DEVICES}-device CPU mesh")
  print(f"{'mesh (d,f,t)':12s} {'batch':>5s} {'params':>7s} {'opt':>6s} {'argument':>8s} "
        f"{'output':>7s} {'alias':>6s} {'temp':>6s} {'total':>6s} {'compile s':>9s} "
        f"{'RSS GB':>7s}")
  for r in runs:
    mesh = ",".join(str(n) for n in r["mesh"].values())
    if "error" in r:
      print(f"{mesh:12s} {r['global_batch']:5d}  failed: {r['error'].splitlines()[0]}")
      continue
    m, b = r["memory_per_device"], r["bytes_per_device"]
    print(f"{mesh:12s} {r['global_batch']:5d} {_gb(b['parameters']):>7s} "
          f"{_gb(b['optimizer_state']):>6s} {_gb(m['argument']):>8s} {_gb(m['output']):>7s} "
          f"{_gb(m['alias']):>6s} {_gb(m['temp']):>6s} {_gb(m['total']):>6s} "
          f"{r['compile_s']:9.1f} {r['peak_rss_gb']:7.2f}")


def _run(args: list[str], description: dict, timeout_s: float,
         env: dict[str, str] | None = None) -> dict:
  """One worker's record, or `description` with the error if it failed or ran out of time."""
  print(f"running {description} ...", flush=True)
  start, load = time.time(), os.getloadavg()[0]  # the machine may be shared: load slows a run
  try:
    result = common.run_worker(__file__, args, env=env, timeout=timeout_s)
  except Exception as error:  # noqa: BLE001  (a failed configuration is a result to report)
    result = {**description, "error": f"{type(error).__name__}: {error}"[-4000:]}
  result.update(wall_s=time.time() - start, load_average_1min=[load, os.getloadavg()[0]],
                date=_now())
  return result


def _parse_throughput(items: list[str]) -> list[tuple[str, int]]:
  """["demo:0,1,3", "mid:1,3"] -> [("demo", 0), ("demo", 1), ...]."""
  return [(model, int(stage)) for item in items
          for model, _, stages in [item.partition(":")] for stage in stages.split(",")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--throughput", nargs="*", default=["demo:0,1,3", "mid:1,3"],
                      help="model:stage,stage,... runs on one CPU device (none: skip, keeping "
                      "the output file's earlier results)")
  parser.add_argument("--targets", nargs="*", type=int, default=[8, 200],
                      help="target slots T of the throughput runs, each run at every T")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per throughput run")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--meshes", nargs="*", default=["1,8,1", "2,4,1"],
                      help=f"(data,fsdp,tensor) meshes of {MESH_DEVICES} devices (none: skip, "
                      "keeping the output file's earlier results)")
  parser.add_argument("--global-batches", nargs="*", type=int, default=[8, 16])
  parser.add_argument("--memory-preset", default="full")
  parser.add_argument("--memory-stage", type=int, default=3)
  parser.add_argument("--memory-targets", type=int, default=0,
                      help="target slots T (0: the released config's 200)")
  parser.add_argument("--fast-compile", action="store_true",
                      help="compile the memory runs with FAST_COMPILE (LLVM passes off)")
  parser.add_argument("--timeout-minutes", type=float, default=15,
                      help="per worker (one configuration); the full-size compile is the slow one")
  parser.add_argument("--output", default=os.path.join(common.ROOT, "benchmarks", "results",
                                                       "train_step.json"))
  parser.add_argument("--worker", choices=("throughput", "memory"), help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--mesh", help=argparse.SUPPRESS)
  parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "throughput":
    print(json.dumps(worker_throughput(args.model, args.stage, args.global_batch, args.steps,
                                       args.warmup, args.targets[0])))
    return
  if args.worker == "memory":
    mesh = tuple(int(n) for n in args.mesh.split(","))
    print(json.dumps(worker_memory(args.model, args.stage, mesh, args.global_batch,
                                   args.memory_targets, args.fast_compile)))
    return

  import flax
  import jax
  record = {
      "date": _now(),
      "machine": common.machine(jax=jax.__version__, flax=flax.__version__,
                                load_average_1min_at_start=os.getloadavg()[0]),
      "throughput": [], "memory": [],
  }
  earlier = {}
  if os.path.exists(args.output):  # a part not run now keeps its earlier results
    with open(args.output) as f:
      earlier = json.load(f)
    record.update({part: earlier.get(part, []) for part, run in
                   (("throughput", args.throughput), ("memory", args.meshes)) if not run})
  runs_now = {(model, stage, targets) for model, stage in _parse_throughput(args.throughput)
              for targets in args.targets}
  if args.throughput:  # so does a throughput run (model, stage, T) not repeated now
    record["throughput"] = [
        r for r in earlier.get("throughput", [])
        if (r["model"], r["stage"], r.get("max_targets")) not in runs_now]
  for model, stage in _parse_throughput(args.throughput):
    for targets in args.targets:
      record["throughput"].append(_run(
          ["--worker", "throughput", "--model", model, "--stage", str(stage), "--global-batch",
           str(THROUGHPUT_BATCH[model]), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--targets", str(targets)],
          {"model": model, "stage": stage, "max_targets": targets}, args.timeout_minutes * 60))
  simulated = {"XLA_FLAGS": " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={MESH_DEVICES}"])),
      "JAX_PLATFORMS": "cpu"}
  for mesh in args.meshes:
    for global_batch in args.global_batches:
      record["memory"].append(_run(
          ["--worker", "memory", "--model", args.memory_preset, "--stage",
           str(args.memory_stage), "--mesh", mesh, "--global-batch", str(global_batch),
           "--memory-targets", str(args.memory_targets),
           *(["--fast-compile"] if args.fast_compile else [])],
          {"preset": args.memory_preset, "stage": args.memory_stage,
           "mesh": dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split(",")))),
           "global_batch": global_batch}, args.timeout_minutes * 60, env=simulated))
  record["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
  common.write_json(record, args.output)
  if record["throughput"]:
    _print_throughput(record["throughput"])
  if record["memory"]:
    _print_memory(record["memory"])


if __name__ == "__main__":
  main()
