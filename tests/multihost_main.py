"""main.py, recording which datapoints this process fed to each global batch.

Run by test_multihost.py in place of `python main.py` (same flags): before handing over to
main.py's own `main`, it wraps `input_pipeline.make_global_batch` (and, to tell training from
evaluation batches, `loop.run_evaluation`) so that every host batch's datapoint ids are appended, one JSON line per batch, to
`$MULTIHOST_RECORD_DIR/datapoints.<process index>.jsonl` ({"kind": "train" | "eval",
"ids": [...], "valid": [...]}).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402

import input_pipeline  # noqa: E402
import main  # noqa: E402
from sam3i_jax.train import loop  # noqa: E402

_make_global_batch = input_pipeline.make_global_batch
_run_evaluation = loop.run_evaluation
phase = ["train"]


def recording_run_evaluation(*args, **kwargs):
  phase[0] = "eval"
  try:
    return _run_evaluation(*args, **kwargs)
  finally:
    phase[0] = "train"


def recording_make_global_batch(host_batch, mesh, data_axes=("data",)):
  import jax
  path = os.path.join(os.environ["MULTIHOST_RECORD_DIR"], f"datapoints.{jax.process_index()}.jsonl")
  row = {"kind": phase[0],
         "ids": [int(i) for i in host_batch["datapoint_id"]],
         "valid": [bool(v) for v in host_batch["example_valid"]]}
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
  return _make_global_batch(host_batch, mesh, data_axes)


if __name__ == "__main__":
  input_pipeline.make_global_batch = recording_make_global_batch
  loop.run_evaluation = recording_run_evaluation
  app.run(main.main)
