"""The tiny model's stage-3 training step compiles for a TPU slice without TPU hardware.

libtpu's deviceless topology (benchmarks/tpu_compile.py) gives the 8 chips of a v5e-8; the step
is lowered on abstract state FSDP-sharded over them and compiled by the TPU compiler, so an op or
a sharding that a TPU cannot compile fails here, on a CPU-only machine.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("libtpu", reason="the [tpu] extra (in the test lock) provides the TPU compiler")

from benchmarks import tpu_compile  # noqa: E402


@pytest.mark.xdist_group("tpu_compile")
def test_tiny_stage3_step_compiles_for_v5e_8():
  devices = tpu_compile.tpu_devices("v5e-8")
  assert len(devices) == 8 and all(d.platform == "tpu" for d in devices)
  assert "v5 lite" in devices[0].device_kind.lower()
  record = tpu_compile.worker_step("v5e-8", stage=3, per_chip=1, preset="tiny", max_targets=8)
  assert record["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and record["global_batch"] == 8
  memory, state = record["memory_per_device"], record["bytes_per_device"]
  # The arguments are this chip's shards of the state and the batch: FSDP splits the parameters
  # (a replicated state would put all of them, ~8x as much, on every chip).
  assert memory["argument"] >= state["model_state"] + state["optimizer_state"] + state["batch"]
  assert memory["argument"] < 2 * (state["model_state"] + state["optimizer_state"] + state["batch"])
  full_bytes = 4 * record["parameters"]["total"]  # float32
  assert state["parameters"] < full_bytes / 4  # sharded: most of them 8 ways
  assert memory["alias"] > 0  # the donated state is updated in place
  assert memory["temp"] > 0 and record["flops_per_device"] > 0
