"""main.py as a user runs it: bad configuration is refused with a clear message, and a training
process killed with SIGKILL while an asynchronous checkpoint save is in flight (the previous
checkpoint complete) and rerun with the same command ends exactly where an uninterrupted run does
(losses of every step, final parameters bit for bit), with a mid-stage step recompilation redone on
resume and the evaluation before training not repeated.

The crashes come from tests/instrumented_main.py (main.py plus MAIN_CRASH): the process kills
itself with SIGKILL at a chosen point, so the crash lands where the test says on any machine.
"""

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from run_records import final_params, logged_rows, train_rows
from sam3i_jax.train import loop
from sam3i_jax.train.checkpoints import Checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUMENTED_MAIN = os.path.join(os.path.dirname(__file__), "instrumented_main.py")
STEPS = 6


def run_main(*flags, crash: str = "", script: str = INSTRUMENTED_MAIN
             ) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MAIN_CRASH=crash)
  return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_unknown_config_field_is_refused_by_name():
  result = run_main("--config=configs/hmpl.py:smoke", "--config.train.global_bacth=4",
                    script=os.path.join(ROOT, "main.py"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert ("unknown config field 'global_bacth' in --config.train.global_bacth=4"
          in result.stderr), result.stderr[-2000:]


@pytest.mark.parametrize("shape, message", [
    ("(3,1,1)", "--config.mesh.shape: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices; "
                "1 available"),
    ("(1,1)", "--config.mesh.shape: mesh shape needs 3 sizes ('data', 'fsdp', 'tensor'), "
              "got [1, 1]"),
])
def test_bad_mesh_shape_is_refused(tmp_path, shape, message):
  result = run_main("--config=configs/hmpl.py:smoke", f"--config.mesh.shape={shape}",
                    f"--config.workdir={tmp_path}", script=os.path.join(ROOT, "main.py"))
  assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def training_flags(workdir, cache) -> list[str]:
  return [
      "--config=configs/hmpl.py:smoke", f"--config.workdir={workdir}",
      f"--config.compilation_cache_dir={cache}", "--config.stages=(1,)",
      f"--config.stage_settings.stage1.steps={STEPS}", "--config.train.checkpoint_every=2",
      # A step recompiled mid-stage, which a resume must redo at the same step.
      "--config.stage_settings.stage1.binary_targets_from_step=3",
      "--config.train.keep_checkpoints=3", "--config.train.log_every=1",
      "--config.eval.levels=('simple',)", "--config.eval.max_batches=1",
      "--config.eval.num_images=1", "--config.eval.before_training=True",
  ]


@pytest.mark.xdist_group("train_loop")
def test_killed_while_checkpointing_then_rerun_equals_uninterrupted(tmp_path, jax_cache):
  cache = jax_cache
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  checkpoint_dir = crashed / "stage1" / "checkpoints"
  result = run_main(*training_flags(straight, cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stage 1 step 3: binary classification targets from here on" in result.stdout

  # Killed after step 4 while its checkpoint is written, the one of step 2 complete: a partial
  # directory is left, and it is not a checkpoint.
  result = run_main(*training_flags(crashed, cache), crash="in_save:4")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert "MAIN_CRASH: SIGKILL while saving checkpoint 4" in result.stdout
  assert glob.glob(str(checkpoint_dir / "4.orbax-checkpoint-tmp*")), os.listdir(checkpoint_dir)
  assert Checkpoints(checkpoint_dir).all_steps() == [2]

  # The same command again: it resumes from the last complete checkpoint and finishes.
  result = run_main(*training_flags(crashed, cache))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stage 1: resumed at step 2" in result.stdout
  assert "stage 1 step 3: binary classification targets from here on" in result.stdout

  # The evaluation before training ran once, in the first run, and the table shows both phases.
  assert [row["step"] for row in logged_rows(crashed, "eval")] == [0, STEPS]
  with open(crashed / "metrics.json") as f:
    table = loop.progress_table(json.load(f)).splitlines()
  assert table[1].split() == ["level", loop.INITIAL, "stage1"] and table[2].startswith("simple")
  assert list((crashed / "stage1" / "predictions").glob("simple_*.png"))
  assert list((crashed / "tensorboard").iterdir())

  want, got = train_rows(straight), train_rows(crashed)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    for key in ("loss", "grad_norm", "param_norm"):
      assert got[step][key] == want[step][key], (step, key)
  want, got = final_params(straight), final_params(crashed)
  assert want.keys() == got.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))
