"""main.py with test instrumentation, switched on by environment variables (same flags as main.py).

MAIN_RECORD_DIR=DIR: every host batch's datapoint ids are appended, one JSON line per batch, to
  DIR/datapoints.<process index>.jsonl ({"kind": "train" | "eval", "ids": [...], "valid": [...]});
  test_multihost.py checks with it which data each process read.
MAIN_CRASH=in_save:N: SIGKILL this process as soon as the save of the checkpoint of step N has
  been started (an asynchronous save in flight).
"""

import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402

import input_pipeline  # noqa: E402
import main  # noqa: E402
from sam3i_jax.train import loop  # noqa: E402
from sam3i_jax.train.checkpoints import Checkpoints  # noqa: E402


def record_datapoints(directory: str) -> None:
  make_global_batch, run_evaluation = input_pipeline.make_global_batch, loop.run_evaluation
  phase = ["train"]

  def recording_run_evaluation(*args, **kwargs):
    phase[0] = "eval"
    try:
      return run_evaluation(*args, **kwargs)
    finally:
      phase[0] = "train"

  def recording_make_global_batch(host_batch, mesh, data_axes=("data",)):
    import jax
    row = {"kind": phase[0], "ids": [int(i) for i in host_batch["datapoint_id"]],
           "valid": [bool(v) for v in host_batch["example_valid"]]}
    with open(os.path.join(directory, f"datapoints.{jax.process_index()}.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    return make_global_batch(host_batch, mesh, data_axes)

  input_pipeline.make_global_batch = recording_make_global_batch
  loop.run_evaluation = recording_run_evaluation


def crash(spec: str) -> None:
  kind, _, number = spec.partition(":")
  if kind != "in_save" or not number.isdigit():
    raise ValueError(f"MAIN_CRASH={spec!r}: expected in_save:N")
  save = Checkpoints.save

  def crashing_save(self, at_step, *args, **kwargs):
    save(self, at_step, *args, **kwargs)
    if at_step == int(number):
      print(f"MAIN_CRASH: SIGKILL while saving checkpoint {at_step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  Checkpoints.save = crashing_save


if __name__ == "__main__":
  if os.environ.get("MAIN_RECORD_DIR"):
    record_datapoints(os.environ["MAIN_RECORD_DIR"])
  if os.environ.get("MAIN_CRASH"):
    crash(os.environ["MAIN_CRASH"])
  app.run(main.main, flags_parser=main.parse_flags)
