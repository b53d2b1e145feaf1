"""The config's cross-field constraints, checked before anything compiles: each broken one is one
line naming the fields, their values and what to set (main.py prints it as a usage error).

Each constraint is otherwise met deep inside a traced function (the loss's replica split, the
accumulation's micro-batches, a batch sharded over the mesh) as a traceback.
"""

from __future__ import annotations

import math

import ml_collections

from sam3i_jax.train import sharding as sharding_lib


class ConfigError(ValueError):
  """Fields of the config that contradict each other (or the machine)."""


def _divisors(n: int) -> str:
  found = [d for d in range(1, n + 1) if n % d == 0]
  return ", ".join(map(str, found[:8])) + (" ..." if len(found) > 8 else "")


def data_parallel_size(config: ml_collections.ConfigDict, devices: int) -> int:
  """How many ways a batch is split: the mesh axes that the batch's logical axis maps to."""
  shape = list(config.mesh.shape)
  if -1 in shape:
    shape[shape.index(-1)] = devices // math.prod(s for s in shape if s != -1)
  sizes = dict(zip(sharding_lib.MESH_AXES, shape))
  return math.prod(sizes[a] for a in sharding_lib.batch_axes(tuple(config.mesh.logical_rules)))


def check(config: ml_collections.ConfigDict, *, devices: int, processes: int) -> None:
  """Raises ConfigError for the first constraint the config breaks (the mesh's own shape is
  `sharding.make_mesh`'s to check)."""
  train, data = config.train, config.data
  batch, accum, replicas = train.global_batch, train.accum_steps, train.loss_replicas
  parallel = data_parallel_size(config, devices)
  if config.mode != "eval":
    if batch % processes:
      raise ConfigError(f"train.global_batch={batch} is not a multiple of the {processes} "
                        "processes, which each read an equal share: set it to a multiple of "
                        f"{processes}")
    if accum < 1 or batch % accum:
      raise ConfigError(f"train.global_batch={batch} is not a multiple of train.accum_steps="
                        f"{accum}: set accum_steps to one of {_divisors(batch)}")
    micro = batch // accum
    if micro % replicas:
      raise ConfigError(
          f"the micro-batch of {micro} (train.global_batch={batch} / train.accum_steps={accum}) "
          f"is not a multiple of train.loss_replicas={replicas}, the GPUs whose per-GPU loss "
          f"normalisation the recipe reproduces: set --config.train.loss_replicas to one of "
          f"{_divisors(micro)} (1: the loss normalised over the whole batch)")
    if batch % parallel:
      raise ConfigError(
          f"train.global_batch={batch} does not split over the {parallel} data-parallel devices "
          f"of mesh.shape={tuple(config.mesh.shape)}: set it to a multiple of {parallel}, or "
          "shard the model over more of them (the mesh's tensor size)")
  eval_batch = data.eval_batch_size * processes
  if eval_batch % parallel:
    raise ConfigError(
        f"data.eval_batch_size={data.eval_batch_size} (per process; x {processes} processes = "
        f"{eval_batch}) does not split over the {parallel} data-parallel devices of mesh.shape="
        f"{tuple(config.mesh.shape)}: set it so that {processes} x eval_batch_size is a multiple "
        f"of {parallel}")
