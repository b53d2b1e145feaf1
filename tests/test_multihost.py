"""Multi-process training for real: main.py's --multihost path with 2 processes on loopback
(jax.distributed over gloo CPU collectives, 4 simulated devices each) against 1 process with 8.

Three runs of the smoke config's stage 1 (4 steps, checkpoint every 2, evaluation of the simple
level on 16 samples), all on the (8, 1, 1) mesh with the same global batches:
  first     1 process,   steps 1-2, stop (checkpoint written by 1 process)
  two_last  2 processes, resume first's checkpoint: steps 3-4, evaluation, final model (the
            checkpoint of step 4 and the final model written by 2 processes)
  one_last  1 process,   resumes first's checkpoint: the same steps
Per-step losses of 1 and 2 processes agree (gloo's reductions run in another order than XLA's
in-process ones: relative 1e-5), as do the final parameters; each process of the 2-process run fed
disjoint datapoints whose union is the 1-process run's global batch; the evaluation counts the
samples of both processes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from run_records import final_params, logged_rows, train_rows
from xla_cpu import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPER = os.path.join(os.path.dirname(__file__), "instrumented_main.py")
DEVICES = 8
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6
EVAL_SAMPLES = 16


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main_flags(workdir, cache, processes: int, stop_after: int) -> list[str]:
  return [
      "--config=configs/hmpl.py:smoke", f"--config.workdir={workdir}",
      f"--config.compilation_cache_dir={cache}", "--config.stages=(1,)",
      "--config.stage_settings.stage1.steps=4", "--config.train.checkpoint_every=2",
      "--config.train.log_every=1", f"--config.train.stop_after_steps={stop_after}",
      "--config.eval.levels=('simple',)", "--config.eval.num_images=0",
      # A global evaluation batch of 8 either way, so 2 batches are the same 16 samples.
      f"--config.data.eval_batch_size={8 // processes}",
      f"--config.eval.max_batches={EVAL_SAMPLES // 8}",
  ]


def run_main(workdir, cache, processes: int, stop_after: int = 0) -> None:
  """main.py (through the recording wrapper) in `processes` processes; raises with their logs.
  Gloo's CPU collectives wait 30 s for a peer, so the processes must keep in step: on 2 cores
  beside other tests (the full-size one) they drifted further apart, hence `alone`."""
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", MAIN_RECORD_DIR=str(workdir),
             XLA_FLAGS=xla_flags(DEVICES // processes))
  flags = main_flags(workdir, cache, processes, stop_after)
  if processes > 1:
    flags += ["--multihost", f"--coordinator_address=127.0.0.1:{free_port()}",
              f"--num_processes={processes}"]
  logs = [open(os.path.join(workdir, f"log.{i}.txt"), "w") for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, WRAPPER, *flags]
                            + ([f"--process_id={i}"] if processes > 1 else []),
                            cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(processes)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
    for f in logs:
      f.close()
  if any(codes):
    tails = "\n".join(f"--- process {i} (exit {c}):\n" + open(f.name).read()[-3000:]
                      for i, (c, f) in enumerate(zip(codes, logs)))
    raise AssertionError(f"main.py in {processes} process(es) failed:\n{tails}")


def fed(workdir, process: int, kind: str) -> list[list[int]]:
  """The datapoint ids (valid examples) that `process` fed to each `kind` batch."""
  with open(os.path.join(workdir, f"datapoints.{process}.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["kind"] == kind]
  return [[i for i, v in zip(r["ids"], r["valid"]) if v] for r in rows]


def resume_from(source, workdir) -> None:
  shutil.copytree(os.path.join(source, "stage1", "checkpoints"),
                  os.path.join(workdir, "stage1", "checkpoints"))


@pytest.mark.alone  # see run_main
def test_two_processes_train_evaluate_and_checkpoint_like_one(tmp_path, jax_cache):
  cache = jax_cache
  first, one_last, two_last = tmp_path / "first", tmp_path / "one_last", tmp_path / "two_last"
  run_main(first, cache, 1, stop_after=2)
  resume_from(first, two_last)
  run_main(two_last, cache, 2)
  resume_from(first, one_last)
  run_main(one_last, cache, 1)

  for workdir, processes in ((two_last, 2), (one_last, 1)):
    for i in range(processes):
      log = open(workdir / f"log.{i}.txt").read()
      assert "stage 1: resumed at step 2" in log or i > 0, log[-2000:]
      assert "restacking" not in log, log[-2000:]
      # The data position is re-split only across a change in the number of processes.
      assert ("data position saved by 1 process(es), split over 2" in log) == (processes == 2), \
          log[-2000:]
  assert (two_last / "stage1" / "final").is_dir()

  # Losses of steps 3-4 after restoring the 1-process checkpoint on 1 and on 2 processes.
  want, got = train_rows(one_last), train_rows(two_last)
  assert sorted(want) == sorted(got) == [3, 4]
  for step in (3, 4):
    for key in ("loss", "simple/loss_ce", "simple/loss_mask", "grad_norm"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=LOSS_RTOL,
                                 err_msg=f"step {step} {key}")
  assert train_rows(one_last)[4]["param_norm"] != train_rows(first)[2]["param_norm"]

  # Final parameters of the two resumed runs.
  want, got = final_params(one_last), final_params(two_last)
  assert want.keys() == got.keys()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=0, atol=PARAM_ATOL, err_msg=str(key))

  # Data: per step, the 2 processes fed disjoint halves of the 1-process global batch.
  global_batches = fed(one_last, 0, "train")
  halves = list(zip(fed(two_last, 0, "train"), fed(two_last, 1, "train")))
  assert len(global_batches) == len(halves) == 2
  for batch, (one, other) in zip(global_batches, halves):
    assert len(batch) == 8 and len(one) == len(other) == 4
    assert not set(one) & set(other)
    assert sorted(one + other) == sorted(batch)

  # Evaluation: both processes' samples are counted, and the metrics equal 1 process's.
  one, other = fed(two_last, 0, "eval"), fed(two_last, 1, "eval")
  assert sum(map(len, one)) == sum(map(len, other)) == EVAL_SAMPLES // 2
  assert not set(sum(one, [])) & set(sum(other, []))
  (want,), (got,) = logged_rows(one_last, "eval"), logged_rows(two_last, "eval")
  assert got["all/count"] == want["all/count"] == EVAL_SAMPLES
  for key, value in want.items():
    if key.endswith(("/count", "IoU", "P@0.5")):
      np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
