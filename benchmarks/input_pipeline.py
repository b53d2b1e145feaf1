"""Input pipeline throughput: samples/s per CPU worker at 1008 px with masks, on the demo set.

  python benchmarks/input_pipeline.py [--batches 12] [--repeats 3] [--batch-size 8]
                                      [--max-targets 200] [--workers N]
                                      [--output benchmarks/results/input_pipeline.json]

Runs the real training pipeline (demo JSON files -> TrainTransform -> batches of the batch
contract: 1008 x 1008 float32 images, (max_targets, 288, 288) masks, tokens) at the full model's
sizes, and times whole batches after one warm-up batch:
  in_process   worker_count=0, read_threads=0: the transform on one core, i.e. one worker's rate;
  threads_N    worker_count=0, read_threads=N: N threads in this process (no inter-process copy;
               PIL and numpy release the GIL for most of the work);
  workers_N    worker_count=N grain worker processes (one per core by default), each reading
               with one thread; reported as total and per-worker samples/s (this includes moving
               each batch between processes through shared memory).
Also times the eval transform (exact torchvision-equivalent resize to 1008) in-process, and the
generation of the demo set itself (unless --data names an existing one). Each run
is repeated with a fresh iterator (the machine may be shared; the load average is recorded) and
the median is reported. Target: >= 25 samples/s per worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import input_pipeline  # noqa: E402
from benchmarks import common  # noqa: E402
from input_pipeline import demo_data  # noqa: E402
from sam3i_jax import get_preset  # noqa: E402


def _rate(pipeline: input_pipeline.Pipeline, batches: int, batch_size: int, repeats: int,
          share: int) -> dict:
  """Samples/s of `repeats` fresh iterators (each timed after its first batch)."""
  rates, first = [], []
  for _ in range(repeats):
    iterator = pipeline.iterator()
    start = time.perf_counter()
    next(iterator)  # warm-up: worker start, tokenizer vocabulary, first decode
    warm = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    rates.append(batches * batch_size / (time.perf_counter() - warm))
    first.append(warm - start)
    if hasattr(iterator, "close"):
      iterator.close()
  return {"samples_per_s": rates, "first_batch_s": first,
          "median_samples_per_s": statistics.median(rates),
          "median_per_worker_samples_per_s": statistics.median(rates) / share}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-targets", type=int, default=200)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--data", default=None, help="demo set folder (default: a temporary one)")
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "input_pipeline.json"))
  args = parser.parse_args(argv)
  model = get_preset("full")
  load = os.getloadavg()[0]  # the machine may be shared: other load slows every run
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    root = demo_data.ensure_demo_data(args.data or os.path.join(tmp, "demo"))
    generation_s = None if args.data else time.perf_counter() - start
    if generation_s is not None:
      print(f"demo set generated in {generation_s:.1f} s")
    config = input_pipeline.default_config("demo")
    config.data_root = str(root)
    config.batch_size = config.eval_batch_size = args.batch_size
    config.max_targets = args.max_targets
    n = args.workers
    settings = {  # run -> (config changes, how many workers or threads share the rate)
        "in_process": (dict(read_threads=0, read_buffer=1, worker_count=0), 1),
        f"threads_{n}": (dict(read_threads=n, read_buffer=n, worker_count=0), n),
        f"workers_{n}": (dict(read_threads=0, read_buffer=1, worker_count=n), n),
    }
    runs = {}
    for name, (changes, share) in settings.items():
      config.update(changes)
      pipeline = input_pipeline.train_pipeline(config, model, process_index=0, process_count=1)
      runs[name] = _rate(pipeline, args.batches, args.batch_size, args.repeats, share)
    config.update(settings["in_process"][0])
    pipeline = input_pipeline.eval_pipeline(config, model, process_index=0, process_count=1)
    runs["eval_in_process"] = _rate(pipeline, max(args.batches // 3, 1), args.batch_size,
                                    args.repeats, 1)
  record = {
      "image_size": model.img_size, "mask_size": model.mask_size,
      "max_targets": args.max_targets, "batch_size": args.batch_size,
      "batches_timed": args.batches, "repeats": args.repeats,
      "dataset": "demo set (256 px JPEG, 0-6 targets per datapoint)",
      "machine": common.machine(load_average_1min_at_start=load,
                                load_average_1min_at_end=os.getloadavg()[0]),
      "runs": runs, "target_per_worker_samples_per_s": 25,
      "demo_set_generation_s": generation_s,  # None with --data (an existing set)
  }
  for run, result in runs.items():
    print(f"{run:>16}: median {result['median_samples_per_s']:6.1f} samples/s "
          f"({result['median_per_worker_samples_per_s']:.1f} per worker or thread); runs "
          + ", ".join(f"{r:.1f}" for r in result["samples_per_s"]))
  common.write_json(record, args.output)


if __name__ == "__main__":
  main()
