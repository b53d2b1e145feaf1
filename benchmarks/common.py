"""What every benchmark script shares: machine facts, worker subprocesses and the JSON record."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
  """The machine a record was measured on: CPU model, core count, Python, plus `extra`."""
  return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), **extra}


def peak_rss_gb() -> float:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_worker(script: str, args: Sequence[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
  """Runs `python script *args` with the repository on PYTHONPATH (plus `env`) and returns the
  JSON object that the worker prints as its last line of stdout."""
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                        timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def median_call_ms(fn, args, repeats: int) -> tuple[float, float]:
  """(median wall ms, median CPU ms) of `repeats` calls of the jitted `fn(*args)` after a warm-up
  call (compile excluded)."""
  import statistics
  import time

  import jax
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append((time.perf_counter() - start) * 1e3)
    cpu.append((time.process_time() - start_cpu) * 1e3)
  return statistics.median(wall), statistics.median(cpu)


def write_json(record: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {path}")
