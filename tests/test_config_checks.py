"""Cross-field config mistakes get one line naming the fields and the fix, before anything
compiles (sam3i_jax/train/config_checks.py; main.py prints it as a usage error)."""

import os
import subprocess
import sys

import pytest

from configs import hmpl
from sam3i_jax.train import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def released(**train):
  config = hmpl.get_config()
  config.unlock()
  config.train.update(train)
  return config


@pytest.mark.parametrize("change, devices, processes, message", [
    (dict(train=dict(global_batch=3)), 8, 1,
     r"the micro-batch of 3 \(train.global_batch=3 / train.accum_steps=1\) is not a multiple of "
     r"train.loss_replicas=16, .* set --config.train.loss_replicas to one of 1, 3 \(1: "),
    (dict(train=dict(accum_steps=5)), 8, 1,
     r"train.global_batch=32 is not a multiple of train.accum_steps=5: set accum_steps to one of "
     r"1, 2, 4, 8, 16, 32"),
    (dict(train=dict(global_batch=30, loss_replicas=1)), 8, 4,
     r"train.global_batch=30 is not a multiple of the 4 processes"),
    (dict(train=dict(global_batch=12, loss_replicas=1)), 8, 1,
     r"train.global_batch=12 does not split over the 8 data-parallel devices of "
     r"mesh.shape=\(-1, 1, 1\): set it to a multiple of 8"),
    (dict(train=dict(global_batch=8, loss_replicas=1), mesh=dict(shape=(2, 4, 1))), 8, 1, None),
    (dict(train=dict(global_batch=12, loss_replicas=1), mesh=dict(shape=(1, 2, 4))), 8, 1, None),
    (dict(data=dict(eval_batch_size=3)), 8, 1,
     r"data.eval_batch_size=3 \(per process; x 1 processes = 3\) does not split over the 8 "
     r"data-parallel devices"),
    (dict(data=dict(eval_batch_size=2)), 8, 4, None),  # 2 per process x 4 = 8
    (dict(mode="eval", train=dict(global_batch=3)), 8, 1, None),  # training fields unused
])
def test_each_mistake_gets_its_message(change, devices, processes, message):
  config = released()
  for field, value in change.items():
    if isinstance(value, dict):
      config[field].update(value)
    else:
      config[field] = value
  if message is None:
    config_checks.check(config, devices=devices, processes=processes)
  else:
    with pytest.raises(config_checks.ConfigError, match=message):
      config_checks.check(config, devices=devices, processes=processes)


def test_main_prints_one_line_and_compiles_nothing(tmp_path):
  run = subprocess.run(
      [sys.executable, "main.py", "--config=configs/hmpl.py:smoke", "--config.train.global_batch=3",
       "--config.train.loss_replicas=16", f"--config.workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert "Traceback" not in run.stderr
  errors = [line for line in run.stderr.splitlines() if "loss_replicas" in line]
  assert len(errors) == 1 and "set --config.train.loss_replicas to one of 1, 3" in errors[0]
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # stopped before the run began
