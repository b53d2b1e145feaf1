"""What a training run (sam3i_jax.train.loop, through main.py or not) leaves in its workdir, read
back for the tests: metrics.jsonl rows and the stages' final parameters."""

import json
import os

import numpy as np
from flax import nnx

from sam3i_jax.pretrained import load_pretrained
from sam3i_jax.train import loop


def logged_rows(workdir, kind: str) -> list[dict]:
  """metrics.jsonl's rows of `kind` ("train" or "eval"), in the order they were written."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if row["kind"] == kind]


def train_rows(workdir, stage: int = 1) -> dict[int, dict]:
  """Step -> the train row of `stage` logged last for it (a resumed run logs the steps after its
  checkpoint again)."""
  return {row["step"]: row for row in logged_rows(workdir, "train") if row["stage"] == stage}


def params(model) -> dict:
  return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def final_params(workdir, stage: int = 1) -> dict:
  """Every parameter of `stage`'s final model, by path."""
  return params(load_pretrained(os.path.join(workdir, f"stage{stage}", loop.FINAL_DIR)))
