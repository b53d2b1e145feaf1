"""The training job (main.py's loop) on the demo set: stopping and resuming gives exactly the
uninterrupted run; the sharded step equals the single-device step on 8 simulated devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import input_pipeline
from configs import hmpl
from sam3i_jax import partition
from sam3i_jax.pretrained import load_pretrained
from sam3i_jax.train import loop
from sam3i_jax.train.checkpoints import Checkpoints


def smoke_config(workdir, cache_dir, **train):
  config = hmpl.get_config("smoke")
  config.unlock()
  config.workdir = str(workdir)
  config.compilation_cache_dir = str(cache_dir)
  config.stages = (1,)
  config.stage_settings.stage1.steps = 4
  config.stage_settings.stage1.binary_targets_from_step = 3  # a recompiled step mid-stage
  config.train.update(log_every=1, checkpoint_every=2, **train)
  config.eval.levels = ("simple",)
  config.eval.max_batches = 1
  config.eval.num_images = 1
  config.eval.before_training = True
  config.data.batch_size = config.train.global_batch = 4
  config.lock()
  return config


def train_log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f) if row["kind"] == "train"}


def trainable_params(workdir):
  model = load_pretrained(os.path.join(workdir, "stage1", loop.FINAL_DIR))
  return {k: np.asarray(v) for k, v in
          nnx.to_flat_state(nnx.state(model, partition.trainable(1)))}


@pytest.mark.xdist_group("train_loop")
def test_stop_and_resume_equals_uninterrupted_run(tmp_path, capsys):
  cache = tmp_path / "jax_cache"
  straight = tmp_path / "straight"
  loop.run(smoke_config(straight, cache))
  assert "stage 1 step 3: binary classification targets from here on" in capsys.readouterr().out
  resumed = tmp_path / "resumed"
  first = loop.run(smoke_config(resumed, cache, stop_after_steps=2))
  assert "stage1" not in first and not os.path.exists(resumed / "stage1" / loop.FINAL_DIR)
  assert sorted(train_log(resumed)) == [1, 2]
  results = loop.run(smoke_config(resumed, cache))
  assert "step 3: binary classification targets" in capsys.readouterr().out
  assert results["stage1"]["all"]["count"] > 0
  # The initial evaluation ran once, before the first step, and is not redone on resume.
  evals = [row for row in map(json.loads, open(resumed / "metrics.jsonl")) if row["kind"] == "eval"]
  assert [row["step"] for row in evals] == [0, 4] and results[loop.INITIAL] == first[loop.INITIAL]
  table = loop.progress_table(results).splitlines()
  assert table[1].split() == ["level", loop.INITIAL, "stage1"] and table[2].startswith("simple")
  want, got = train_log(straight), train_log(resumed)
  assert sorted(got) == [1, 2, 3, 4]
  for step in (3, 4):
    for key in ("loss", "simple/loss_ce", "grad_norm", "lr/default"):
      assert got[step][key] == want[step][key], (step, key)
  straight_params, resumed_params = trainable_params(straight), trainable_params(resumed)
  assert straight_params.keys() == resumed_params.keys()
  for key, value in straight_params.items():
    np.testing.assert_array_equal(resumed_params[key], value, err_msg=str(key))
  assert list((resumed / "stage1" / "predictions").glob("simple_*.png"))
  assert list((resumed / "tensorboard").iterdir())


@pytest.mark.xdist_group("train_sharded")
def test_sharded_step_equals_single_device_step():
  script = os.path.join(os.path.dirname(__file__), "train_sharded_check.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["update_max_abs"] > 1e-4
  for shape in ("(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)"):
    assert report[shape]["loss_rel"] < 1e-5, (shape, report[shape])  # losses and grad norms
    assert report[shape]["param_rel_l2"] < 1e-4, (shape, report[shape])
    assert report[shape]["param_max_abs"] < 1e-6, (shape, report[shape])
  # FSDP and tensor sharding actually split parameters.
  assert report["(2, 4, 1)"]["sharded_params"] > 0 and report["(2, 2, 2)"]["sharded_params"] > 0
  # A checkpoint of the (2, 4, 1) run restores exactly onto the (2, 2, 2) mesh's shardings.
  restored = report["restore_(2, 4, 1)_on_(2, 2, 2)"]
  assert restored["max_abs"] == 0 and restored["on_target_shardings"] and restored["leaves"] > 100


@pytest.mark.xdist_group("train_loop")
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A NaN image in the third batch: the run stops naming the step and the datapoints, and the
  checkpoint of step 2 stays the latest."""
  real = input_pipeline.make_global_batch
  calls = []

  def poisoned(host_batch, mesh, axes):
    calls.append(np.asarray(host_batch["datapoint_id"]).tolist())
    if len(calls) == 3:
      host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan))
    return real(host_batch, mesh, axes)

  monkeypatch.setattr(input_pipeline, "make_global_batch", poisoned)
  workdir = tmp_path / "nan"
  config = smoke_config(workdir, tmp_path / "jax_cache")
  config.unlock()
  config.train.checkpoint_every = 1
  config.eval.before_training = False  # its batches would go through make_global_batch too
  config.lock()
  with pytest.raises(loop.NonFiniteLossError, match=r"stage 1 step 3: loss nan") as error:
    loop.run(config)
  assert str(calls[2]) in str(error.value)
  checkpoints = Checkpoints(workdir / "stage1" / "checkpoints")
  assert checkpoints.latest_step() == 2 and checkpoints.all_steps() == [1, 2]
  assert not (workdir / "stage1" / loop.FINAL_DIR).exists()
