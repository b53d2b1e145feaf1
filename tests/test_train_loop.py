"""The training job (sam3i_jax.train.loop) on the demo set: the curriculum of stages 1 -> 2 -> 3
restarted and resumed mid-stage equals the uninterrupted one, with frozen weights untouched; a
non-finite step stops the run; the sharded step equals the single-device step on 8 simulated
devices. (Crashes and resumes of main.py itself: test_main.py.)"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import input_pipeline
from configs import hmpl
from sam3i_jax import partition
from run_records import final_params, params, train_rows
from sam3i_jax.pretrained import load_pretrained
from sam3i_jax.train import loop
from sam3i_jax.train.checkpoints import Checkpoints
from xla_cpu import xla_flags


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


@pytest.mark.xdist_group("train_sharded")
def test_sharded_step_equals_single_device_step():
  script = os.path.join(os.path.dirname(__file__), "train_sharded_check.py")
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
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
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                  jax_cache):
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
  config = smoke_config(workdir, jax_cache)
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


def curriculum_config(workdir, cache_dir, stop_after_steps: int = 0):
  config = hmpl.get_config("smoke")
  config.unlock()
  config.workdir = str(workdir)
  config.compilation_cache_dir = str(cache_dir)
  config.stages = (1, 2, 3)
  for stage, steps in ((1, 2), (2, 2), (3, 4)):
    config.stage_settings[f"stage{stage}"].steps = steps
  config.train.update(log_every=1, checkpoint_every=2, stop_after_steps=stop_after_steps)
  config.eval.levels = ("complex",)
  config.eval.max_batches = 1
  config.eval.num_images = 0
  config.data.batch_size = config.train.global_batch = 4
  config.lock()
  return config


@pytest.mark.xdist_group("train_loop")
def test_curriculum_resumes_mid_stage3_skips_finished_stages_and_keeps_frozen_weights(
    tmp_path, capsys, jax_cache):
  """Stages 1 -> 2 -> 3 through the loop (stage 2's migration, stage 3's two branches and
  alignment losses, an evaluation after each stage), against a rerun that finds stages 1 and 2
  finished, stops in the middle of stage 3 and resumes."""
  cache = jax_cache
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  results = loop.run(curriculum_config(straight, cache))
  assert {"stage1", "stage2", "stage3"} <= results.keys()
  assert results["stage3"]["level=complex"]["count"] > 0
  for stage in (1, 2):
    shutil.copytree(straight / f"stage{stage}", resumed / f"stage{stage}")
  capsys.readouterr()
  first = loop.run(curriculum_config(resumed, cache, stop_after_steps=2))
  out = capsys.readouterr().out
  assert "stage 1: complete" in out and "stage 2: complete" in out and "stage3" not in first
  assert "stage 3: stopped at step 2/4" in out
  loop.run(curriculum_config(resumed, cache))
  assert "stage 3: resumed at step 2" in capsys.readouterr().out
  rows = open(resumed / "metrics.jsonl").read()
  again = loop.run(curriculum_config(resumed, cache))
  out = capsys.readouterr().out
  assert all(f"stage {stage}: complete" in out for stage in (1, 2, 3)), out
  assert open(resumed / "metrics.jsonl").read() == rows  # nothing trained or evaluated again
  assert again["stage3"] == results["stage3"]

  # Stage 3 after a restart and a mid-stage resume is the uninterrupted stage 3, bit for bit.
  want, got = train_rows(straight, 3), train_rows(resumed, 3)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step in want:
    for key in ("loss", "simple/loss", "complex/loss", "align/infonce", "grad_norm"):
      assert got[step][key] == want[step][key], (step, key)
  assert all(want[step]["align/infonce"] > 0 and want[step]["align/kl"] > 0 for step in want)
  want, got = final_params(straight, 3), final_params(resumed, 3)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))

  # What a stage does not train leaves it bit-identical; what it trains moves.
  config = curriculum_config(straight, cache)
  start = loop.initial_model(config)
  loop.enter_stage(start, 1, None, config.seed)
  before = params(start)
  for stage in (1, 2, 3):
    after = final_params(straight, stage)
    trainable = {k for k, _ in nnx.to_flat_state(
        nnx.state(load_pretrained(straight / f"stage{stage}" / loop.FINAL_DIR),
                  partition.trainable(stage)))}
    assert trainable and before.keys() == after.keys()
    for key, value in before.items():
      if key not in trainable:
        np.testing.assert_array_equal(after[key], value, err_msg=f"stage {stage}: {key}")
    assert sum(not np.array_equal(after[k], before[k]) for k in trainable) > len(trainable) // 2
    if stage == 1:  # stage 2 starts from stage 1's final model with the migration applied
      model = load_pretrained(straight / "stage1" / loop.FINAL_DIR)
      loop.enter_stage(model, 2, 1, config.seed)
      after = params(model)
    before = after
