"""Device mesh, logical axis names of every parameter, and the rules that map them to mesh axes.

Two tables, both plain data that configs/hmpl.py may override (MaxText style, but the logical
names are attached by parameter path rather than in each module, since the module names already
mirror Meta's and say what each tensor is):
- PARAM_AXES: (regex on the dotted parameter path, logical names per dimension). The first rule
  whose regex matches and whose length equals the parameter's rank wins; a parameter that no
  rule names is an error, so a new module cannot silently end up replicated.
- LOGICAL_RULES: logical name -> mesh axis (or axes, or None = replicated).
A dimension that the mesh axes do not divide stays replicated (`describe` lists them).
Parameters of stacked (scanned) layers (sam3i_jax.models.stacking) carry a leading layer axis,
named "layers" ahead of the names their rule gives the per-layer tensor.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam3i_jax.models import stacking
from sam3i_jax.tree_paths import dotted

MESH_AXES = ("data", "fsdp", "tensor")

PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Projections into a wider (heads / hidden) space and back.
    (r"(^|\.)(in_proj|qkv|c_fc|linear1|fc1|lin1|down_proj)\.kernel$", ("embed", "mlp")),
    (r"(^|\.)(out_proj|proj|c_proj|linear2|fc2|lin2|up_proj)\.kernel$", ("mlp", "embed")),
    (r"(^|\.)(in_proj|qkv|c_fc|linear1|fc1|lin1|down_proj)\.bias$", ("mlp",)),
    (r"\.kernel$", ("embed", "mlp")),  # every other dense layer
    (r"\.kernel$", (None, None, "conv_in", "conv_out")),  # HWIO convolutions
    (r"(^|\.)weight$", ("conv_in", "conv_out", None, None)),  # the neck's transposed convs
    (r"token_embedding\.embedding$", ("vocab", "embed")),
    (r"\.embedding$", (None, "embed")),  # queries, presence token, geometry label embeddings
    (r"(pos_embed|positional_embedding)$", (None, None, "embed")),
    (r"(pos_embed|positional_embedding)$", (None, "embed")),
    (r"(bias|scale)$", ("norm",)),
    (r"(^|\.)rngs\.(key|count)$", ()),  # dropout RNG streams: stacked layers hold one per layer
)

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("conv_in", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),  # each device holds its shard of every layer: scan slices layer by layer
)


class MeshShapeError(ValueError):
  """A mesh shape that the devices cannot be laid out in."""


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one place takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise MeshShapeError(f"mesh shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise MeshShapeError(f"at most one -1 in the mesh shape, got {shape}")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise MeshShapeError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} "
                         f"devices; {len(devices)} available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_axes(path: str, ndim: int, param_axes=PARAM_AXES) -> tuple[str | None, ...]:
  lead = ("layers",) if stacking.is_stacked_path(path) else ()
  for pattern, names in param_axes:
    if len(names) == ndim - len(lead) and re.search(pattern, path):
      return lead + tuple(names)
  raise ValueError(f"no logical-axis rule names parameter {path!r} of rank {ndim}; "
                   "add one to PARAM_AXES (or the config's param_axes)")


def partition_spec(logical: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                   rules=LOGICAL_RULES) -> PartitionSpec:
  """Mesh axes per dimension; an axis is used at most once, and only where it divides the dim."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh, param_axes=PARAM_AXES, rules=LOGICAL_RULES):
  """NamedSharding for every leaf of a state pytree (arrays or ShapeDtypeStructs): parameters, and
  the optimizer moments whose paths end with their parameter's, by the logical-axis rules;
  scalars (step counts) replicated."""

  def one(path, leaf):
    shape = tuple(leaf.shape)
    if not shape:
      return NamedSharding(mesh, PartitionSpec())
    names = logical_axes(dotted(path), len(shape), param_axes)
    return NamedSharding(mesh, partition_spec(names, shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)


def batch_axes(rules=LOGICAL_RULES) -> tuple[str, ...]:
  """The mesh axes that the logical "batch" axis (the examples) is split over."""
  axes = dict(rules).get("batch")
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES) -> NamedSharding:
  """Examples split over the batch axes, everything else replicated."""
  spec = partition_spec(("batch",), (mesh.size,), mesh, rules)
  return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (ndim - 1))))
