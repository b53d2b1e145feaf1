"""A converted model directory: orbax parameters + config JSON + tokenizer vocab.

  DIR/config.json              Sam3Config fields (and `model`: "sam3", or "sam3i" with adapters)
  DIR/params/                  orbax checkpoint of the nnx.Param state (float32)
  DIR/bpe_simple_vocab_16e6.txt.gz   the CLIP BPE vocabulary (tokenizer)
  DIR/conversion.json          what the converter read, used and ignored
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.config import Sam3Config

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
REPORT_FILE = "conversion.json"


def save_pretrained(model: nnx.Module, config: Sam3Config, directory: str, *, vocab_path: str | None,
                    report: dict | None = None) -> None:
  """Writes `model`'s parameters and config to `directory` (created; must not hold a checkpoint).
  With several processes every one calls this (orbax writes each array's shards from the process
  that holds them); process 0 writes the other files."""
  import orbax.checkpoint as ocp  # heavy; only needed here

  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS_DIR)):
    raise FileExistsError(f"{directory} already holds a converted checkpoint; choose a new directory")
  os.makedirs(directory, exist_ok=True)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Bounded staging memory: a full-size model (3.4 GB) is written without a second copy in RAM.
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), args=ocp.args.StandardSave(state))
  if jax.process_index() != 0:
    return
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"model": model_kind(config), **config.to_dict()}, f, indent=2)
  if vocab_path is not None:
    shutil.copyfile(vocab_path, os.path.join(directory, VOCAB_FILE))
  if report is not None:
    with open(os.path.join(directory, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)


def model_kind(config: Sam3Config) -> str:
  return "sam3i" if config.adapters else "sam3"


def read_config(directory: str, **overrides) -> Sam3Config:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {directory} a directory written by `python -m convert`?")
  with open(path) as f:
    fields = json.load(f)
  kind = fields.pop("model", "sam3")
  config = Sam3Config.from_dict({**fields, **overrides})
  if kind != model_kind(config):
    raise ValueError(f"{path} describes a {kind!r} model, but its fields give a {model_kind(config)!r} one")
  return config


def load_pretrained(directory: str, *, dtype: str | None = None, sharding=None, **overrides):
  """Loads a converted SAM 3 / SAM3-I directory into a ready `Sam3Image` (eval mode).

  dtype: compute dtype override ("float32"/"bfloat16"); parameters stay float32.
  overrides: other Sam3Config fields that do not change the parameters (e.g. remat="full").
  sharding: optional pytree-prefix sharding for the restored parameters (default: device 0).
  """
  import orbax.checkpoint as ocp

  from sam3i_jax.models.sam3 import abstract_model

  config = read_config(directory, **overrides, **({"dtype": dtype} if dtype else {}))
  abstract = abstract_model(config)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = nnx.to_pure_dict(params)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
  nnx.replace_by_pure_dict(params, _restore_params(directory, target))
  # Committed to the same device as the parameters, so the first jit call and later ones (whose
  # outputs are committed) see the same argument shardings and compile once.
  rest = jax.device_put(jax.tree.map(materialise, rest), jax.devices()[0])
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return model


def _restore_params(directory: str, target: dict) -> dict:
  """The parameters of `directory` laid out as `target` (ShapeDtypeStructs with shardings). A
  directory written before layers were stacked (per-layer parameters, sam3i-jax 0.1) is restacked
  in memory (models/stacking.restack_tree); `python -m convert migrate` rewrites it."""
  import orbax.checkpoint as ocp

  from sam3i_jax.models.stacking import flat_leaves, restack_tree

  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    if flat_leaves(checkpointer.metadata(path).item_metadata).keys() == flat_leaves(target).keys():
      return checkpointer.restore(path, target)
    print(f"{directory}: per-layer parameters (written before layers were stacked); restacking "
          f"them. `python -m convert migrate --input {directory} --output NEW_DIR` rewrites it "
          "in the current layout.", file=sys.stderr)
    source = checkpointer.restore(path)
  try:
    return restack_tree(source, target)
  except ValueError as error:
    raise ValueError(f"{path} does not fit the model of {CONFIG_FILE}: {error}") from None


def materialise(leaf):
  """Non-parameter state of a fresh model (dropout RNG streams, counters) from its abstract shape."""
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jnp.broadcast_to(jax.random.key(0), leaf.shape)  # stacked layers: one key per layer
  return jnp.zeros(leaf.shape, leaf.dtype)
