"""Per-host numpy batches -> global `jax.Array`s sharded over the mesh's data axes, and back."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from input_pipeline import transforms


def split_host_fields(batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(the device arrays of the batch contract, the host-only fields such as eval strings)."""
  device = {k: batch[k] for k in transforms.BATCH_KEYS if k in batch}
  host = {k: v for k, v in batch.items() if k not in device}
  return device, host


def make_global_batch(host_batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                      data_axes: str | Sequence[str] = ("data",)) -> dict[str, jax.Array]:
  """Global arrays whose leading (batch) dimension is split over `data_axes` of `mesh`.

  Each process passes its own host batch (`batch_size` examples per process); the global batch
  is their concatenation in process order. Host-only fields (eval strings) are left out: use
  `split_host_fields` to keep them. The int64 ids (datapoint_id, image_id) arrive as int32 unless
  jax_enable_x64 is on; a value that does not fit is an error.
  """
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  device, _ = split_host_fields(host_batch)
  return {k: jax.make_array_from_process_local_data(sharding, _device_value(k, v))
          for k, v in device.items()}


def host_local_batch(global_arrays: Any, mesh: jax.sharding.Mesh,
                     data_axes: str | Sequence[str] = ("data",)) -> Any:
  """The inverse of `make_global_batch` for a tree of batch-leading arrays (e.g. model outputs):
  this process's rows as numpy, in its host batch's order (resharded over `data_axes` first if
  they are laid out otherwise)."""
  from jax.experimental import multihost_utils
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  local = multihost_utils.global_array_to_host_local_array(
      global_arrays, mesh, jax.tree.map(lambda _: jax.sharding.PartitionSpec(axes), global_arrays))
  return jax.tree.map(np.asarray, local)


def _device_value(key: str, value: Any) -> np.ndarray:
  """int64 ids become int32 unless jax_enable_x64, after checking that they fit (JAX would
  truncate them silently)."""
  value = np.asarray(value)
  if value.dtype != np.int64 or jax.config.jax_enable_x64:
    return value
  info = np.iinfo(np.int32)
  if value.size and (value.min() < info.min or value.max() > info.max):
    raise ValueError(f"{key} holds values outside int32 and jax_enable_x64 is off")
  return value.astype(np.int32)
