"""The full-size step and forward compiled for TPU topologies without TPU hardware.

  python benchmarks/tpu_compile.py [--topologies v5e-8 v6e-8 v5p-8]
                                   [--jobs stage1:2,4 stage2:2,4 stage3:1,2 inference:1,4]
                                   [--preset full] [--timeout-minutes 30]
                                   [--output benchmarks/results/tpu_compile.json]

libtpu (the `[tpu]` extra; it installs on any x86-64 Linux host) describes a TPU slice as
abstract devices (`jax.experimental.topologies.get_topology_desc`); a step lowered with
ShapeDtypeStructs sharded over a mesh of those devices compiles with the TPU compiler itself, so
`memory_analysis()` and `cost_analysis()` are the figures a real slice would see. MaxText's
train_compile.py does the same for its models.

Jobs, `KIND:N,N,...` with N examples per chip (global batch = N x chips):
  stageS     the released recipe's training step of SAM3-I stage S (configs/hmpl.py: bf16
             compute, remat "full" for the ViT / text blocks and the fusion-encoder / decoder
             layers, T = 200 target slots, 1008 px, the stage's losses), parameters and Adam
             moments FSDP-sharded over all chips, state donated (benchmarks/train_step.py's
             worker_memory with the topology's devices);
  inference  the SAM3-I forward at the complex level in eval mode (the full model: ViT, text
             encoder, fusion encoder, decoder, heads), examples split over the chips, bf16
             compute, parameters replicated.
Each job compiles in its own process (JAX_PLATFORMS=cpu) so that its host peak RSS is its own.
Reported per chip: argument, output, alias and temp bytes and their total (argument + output -
alias + temp), the compiler's FLOP count (XLA counts a loop body once, so with scanned layers this
is a lower bound, not the step's FLOPs), lower and compile seconds, host peak RSS. A job not run
keeps its earlier record in the output file. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# name -> (topology_name, chips_per_host_bounds, FSDP mesh (data, fsdp, tensor), HBM GiB per chip)
TOPOLOGIES = {
    "v5e-8": ("v5e:2x4", (2, 2, 1), (1, 8, 1), 16),
    "v6e-8": ("v6e:2x4", (2, 2, 1), (1, 8, 1), 32),
    "v5p-8": ("v5p:2x2x1", (2, 2, 1), (1, 4, 1), 95),
}
DEFAULT_JOBS = ["stage3:1,2", "stage1:2,4", "stage2:2,4", "inference:1,4"]
GIB = 2 ** 30
FIBER_STACK = 16 * 2 ** 20  # bytes, for the TPU compiler's threads (see tpu_devices)
OUT_OF_HBM = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def tpu_devices(topology: str) -> list:
  """The abstract devices of a TPU slice from TOPOLOGIES (no TPU needed)."""
  # libtpu otherwise locks /tmp/libtpu_lockfile for one process at a time; a deviceless
  # compile drives no TPU, so parallel ones (test workers, benchmark jobs) need no lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # libtpu 0.0.42's v6e convolution cost model recurses over fused producer chains deep enough to
  # overflow its compiler threads' default fiber stacks (SIGSEGV "STACK OVERFLOW" in
  # FusedSpatialMajorConvolution::CalculateClassicWindowCost on one decoder layer); 1 MiB
  # already suffices, 16 MiB leaves room for the full-size model.
  if "fibers_default_thread_stack_size" not in os.environ.get("LIBTPU_INIT_ARGS", ""):
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                      + f" --fibers_default_thread_stack_size={FIBER_STACK}").strip()
  from jax.experimental import topologies
  name, bounds, _, _ = TOPOLOGIES[topology]
  return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                           chip_config_name="default",
                                           chips_per_host_bounds=bounds, num_slices=1).devices)


def worker_step(topology: str, stage: int, per_chip: int, preset: str,
                max_targets: int | None) -> dict:
  from benchmarks import train_step
  _, _, mesh_shape, _ = TOPOLOGIES[topology]
  devices = tpu_devices(topology)
  record = train_step.worker_memory(preset, stage, mesh_shape, per_chip * len(devices),
                                    max_targets, False, devices=devices)
  return {**record, "job": f"stage{stage}", "peak_rss_gb": common.peak_rss_gb()}


def worker_inference(topology: str, per_chip: int, preset: str) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from benchmarks import train_step
  from configs import hmpl
  from sam3i_jax.models.config import get_preset
  from sam3i_jax.models.layers import compile_target
  from sam3i_jax.models.sam3 import abstract_model
  from sam3i_jax.train import loop, sharding
  from sam3i_jax.train.checkpoints import abstract_with_shardings

  devices = tpu_devices(topology)
  config = get_preset(preset, adapters=True, dtype=loop.numerics(hmpl.get_config())["dtype"])
  start = time.perf_counter()
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  mesh = sharding.make_mesh((len(devices), 1, 1), devices)  # data parallel, parameters replicated
  abstract_state = abstract_with_shardings(state, sharding.state_shardings(state, mesh))
  batch = per_chip * len(devices)
  split = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
  images = jax.ShapeDtypeStruct((batch, config.img_size, config.img_size, 3), jnp.float32,
                                sharding=split(4))
  tokens = jax.ShapeDtypeStruct((batch, config.context_length), jnp.int32, sharding=split(2))
  build_s = time.perf_counter() - start

  def forward(state, images, tokens):
    outputs = nnx.merge(graphdef, state)(images, tokens, level="complex")
    return {k: outputs[k] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit")}

  step = jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec(sharding.batch_axes())))
  start = time.perf_counter()
  with compile_target("tpu"):  # attention "auto" as on a TPU (this process's backend is CPU)
    lowered = step.lower(abstract_state, images, tokens)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {"job": "inference", "preset": preset, "level": "complex", "dtype": config.dtype,
          "img_size": config.img_size, "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
          "devices": mesh.size, "global_batch": batch, "examples_per_device": per_chip,
          "memory_per_device": train_step.memory_stats(compiled),
          "flops_per_device": train_step.flops(compiled), "build_s": build_s,
          "lower_s": lower_s, "compile_s": compile_s, "peak_rss_gb": common.peak_rss_gb()}


def _parse_jobs(items: list[str]) -> list[tuple[str, int]]:
  """["stage3:1,2", "inference:4"] -> [("stage3", 1), ("stage3", 2), ("inference", 4)]."""
  jobs = []
  for item in items:
    kind, _, counts = item.partition(":")
    if kind not in ("stage1", "stage2", "stage3", "inference") or not counts:
      raise SystemExit(f"bad job {item!r}: KIND:N,N with KIND stage1|stage2|stage3|inference")
    jobs += [(kind, int(n)) for n in counts.split(",")]
  return jobs


def _key(record: dict) -> tuple:
  return (record["topology"], record["job"], float(record["examples_per_device"]), record["preset"])


def _print(records: list[dict]) -> None:
  print("\nPer chip, from the TPU compiler (GiB); TFLOPs: the compiler's count (scan bodies once);"
        " host = this machine")
  print(f"{'topology':9s} {'job':9s} {'ex/chip':>7s} {'argument':>8s} {'output':>7s} "
        f"{'alias':>6s} {'temp':>6s} {'total':>6s} {'HBM':>4s} {'TFLOPs':>7s} {'lower s':>7s} "
        f"{'compile s':>9s} {'host RSS GB':>11s}")
  for r in records:
    head = f"{r['topology']:9s} {r['job']:9s} {r['examples_per_device']:7g}"
    if "out_of_hbm" in r:
      oom = r["out_of_hbm"]
      print(f"{head}  does not fit: the TPU compiler needs {oom['temp_gib']:.2f} GiB of "
            f"temporaries, the chip has {oom['hbm_gib']:.2f} GiB")
      continue
    if "error" in r:
      print(f"{head}  failed: {r['error'].strip().splitlines()[-1][:120]}")
      continue
    m, hbm = r["memory_per_device"], TOPOLOGIES[r["topology"]][3]
    flops = r.get("flops_per_device")
    print(f"{head} {m['argument'] / GIB:8.2f} {m['output'] / GIB:7.2f} {m['alias'] / GIB:6.2f} "
          f"{m['temp'] / GIB:6.2f} {m['total'] / GIB:6.2f} {hbm:4d} "
          f"{(flops or 0) / 1e12:7.1f} {r['lower_s']:7.1f} {r['compile_s']:9.1f} "
          f"{r['peak_rss_gb']:11.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
  parser.add_argument("--jobs", nargs="*", default=DEFAULT_JOBS, help="KIND:N,N (see above)")
  parser.add_argument("--preset", default="full")
  parser.add_argument("--max-targets", type=int, default=0, help="T (0: the released 200)")
  parser.add_argument("--timeout-minutes", type=float, default=30, help="per job")
  parser.add_argument("--output", default=os.path.join(common.ROOT, "benchmarks", "results",
                                                       "tpu_compile.json"))
  parser.add_argument("--worker", nargs=3, metavar=("TOPOLOGY", "KIND", "N"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    topology, kind, per_chip = args.worker[0], args.worker[1], int(args.worker[2])
    if kind == "inference":
      record = worker_inference(topology, per_chip, args.preset)
    else:
      record = worker_step(topology, int(kind.removeprefix("stage")), per_chip, args.preset,
                           args.max_targets or None)
    print(json.dumps({**record, "topology": topology}))
    return

  import libtpu  # noqa: F401  (the [tpu] extra; fail here rather than in every worker)
  earlier = {}
  if os.path.exists(args.output):
    with open(args.output) as f:
      earlier = {_key(r): r for r in json.load(f).get("runs", [])}
  runs = dict(earlier)
  for topology in args.topologies:
    for kind, per_chip in _parse_jobs(args.jobs):
      description = {"topology": topology, "job": kind, "examples_per_device": per_chip,
                     "preset": args.preset}
      print(f"compiling {description} ...", flush=True)
      start, load = time.time(), os.getloadavg()[0]
      try:
        record = common.run_worker(
            __file__, ["--worker", topology, kind, str(per_chip), "--preset", args.preset,
                       "--max-targets", str(args.max_targets)],
            env={"JAX_PLATFORMS": "cpu"}, timeout=args.timeout_minutes * 60)
      except Exception as error:  # noqa: BLE001  (a failed job is a result to report)
        record = {**description, "error": f"{type(error).__name__}: {error}"[-4000:]}
        oom = OUT_OF_HBM.search(str(error))
        if oom:  # the compiler's own figure of what the step would need
          record["out_of_hbm"] = {"temp_gib": float(oom.group(1)), "hbm_gib": float(oom.group(2))}
      record.update(wall_s=time.time() - start, load_average_1min=[load, os.getloadavg()[0]],
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
      runs[_key(record)] = record
      _print([record])
      _write(runs, args.output)  # after every job: a long run keeps what it finished
  _print(_write(runs, args.output))


def _write(runs: dict, path: str) -> list[dict]:
  import flax
  import jax
  from importlib.metadata import version
  order = {name: i for i, name in enumerate(TOPOLOGIES)}
  records = sorted(runs.values(), key=lambda r: (order[r["topology"]], r["job"],
                                                 r["examples_per_device"]))
  common.write_json({"machine": common.machine(jax=jax.__version__, flax=flax.__version__,
                                               libtpu=version("libtpu")),
                     "runs": records}, path)
  return records


if __name__ == "__main__":
  main()
