"""Mesh construction and the logical-axis tables (sam3i_jax.train.sharding); multi-device steps:
test_train_loop.py's sharded check (tests/train_sharded_check.py)."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from sam3i_jax import partition
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import abstract_model
from sam3i_jax.train import sharding


class FakeMesh:
  """Only `shape` is read by partition_spec, so shapes of meshes we lack devices for work."""

  def __init__(self, **shape):
    self.shape = collections.OrderedDict(shape)


def test_partition_spec_uses_divisible_unused_axes():
  mesh = FakeMesh(data=2, fsdp=4, tensor=2)
  assert sharding.partition_spec(("embed", "mlp"), (256, 768), mesh) == PartitionSpec("fsdp",
                                                                                      "tensor")
  # 258 is not a multiple of 4: that dimension stays replicated.
  assert sharding.partition_spec(("embed", "mlp"), (258, 256), mesh) == PartitionSpec(None,
                                                                                      "tensor")
  # An axis is used once per array.
  assert sharding.partition_spec(("embed", "embed"), (8, 8), mesh) == PartitionSpec("fsdp", None)
  assert sharding.partition_spec(("batch", None), (8, 3), mesh) == PartitionSpec(("data", "fsdp"),
                                                                                 None)
  assert sharding.partition_spec(("norm",), (256,), mesh) == PartitionSpec(None)
  # Size-1 mesh axes are dropped, so single-device specs are fully replicated.
  assert sharding.partition_spec(("embed", "mlp"), (256, 768),
                                 FakeMesh(data=1, fsdp=1, tensor=1)) == PartitionSpec(None, None)


def test_logical_axes_rules_and_unknown_parameter():
  assert sharding.logical_axes("a.self_attn.in_proj.kernel", 2) == ("embed", "mlp")
  assert sharding.logical_axes("a.self_attn.out_proj.kernel", 2) == ("mlp", "embed")
  assert sharding.logical_axes("neck.conv.kernel", 4) == (None, None, "conv_in", "conv_out")
  assert sharding.logical_axes("x.norm1.scale", 1) == ("norm",)
  with pytest.raises(ValueError, match="no logical-axis rule names parameter 'x.mystery'"):
    sharding.logical_axes("x.mystery", 2)


@pytest.mark.parametrize("preset, adapters", [("tiny", False), ("tiny", True), ("full", False),
                                               ("full", True)])
def test_every_parameter_is_named_and_the_big_ones_are_sharded(preset, adapters):
  """Every parameter has logical axes. At full size FSDP over 4 devices shards all but ~0.1% of
  SAM 3's parameters, and of what each SAM3-I stage trains (stage 3: 314M, both paths' adapters)
  it leaves only biases and norm scales whole (~0.2%)."""
  model = abstract_model(get_preset(preset, adapters=adapters))
  mesh = FakeMesh(data=2, fsdp=4, tensor=1)

  def replicated_and_total(state) -> tuple[dict[str, int], int]:
    replicated, total = {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      names = sharding.logical_axes(sharding.dotted(path), len(leaf.shape))
      spec = sharding.partition_spec(names, leaf.shape, mesh)
      size = int(np.prod(leaf.shape))
      total += size
      if all(axis is None for axis in spec):
        replicated[sharding.dotted(path)] = size
    return replicated, total

  replicated, total = replicated_and_total(nnx.state(model, nnx.Param))
  if preset == "full":
    assert sum(replicated.values()) < 0.002 * total, (sum(replicated.values()), total)
  if adapters:
    for stage, at_least in ((1, 100e6), (2, 200e6), (3, 300e6)):
      replicated, total = replicated_and_total(nnx.state(model, partition.trainable(stage)))
      if preset == "full":
        assert total > at_least, (stage, total)
        assert sum(replicated.values()) < 0.005 * total, (stage, sum(replicated.values()), total)
        assert all(path.endswith((".bias", ".scale")) for path in replicated), (
            stage, [p for p in replicated if not p.endswith((".bias", ".scale"))])


def test_make_mesh_shapes_and_errors():
  mesh = sharding.make_mesh((-1, 1, 1))
  assert mesh.axis_names == sharding.MESH_AXES and mesh.size == jax.device_count()
  with pytest.raises(ValueError, match="needs 3 sizes"):
    sharding.make_mesh((1, 1))
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh((jax.device_count() + 1, 1, 1))


def test_batch_axes_follow_the_logical_rules():
  assert sharding.batch_axes() == ("data", "fsdp")
  rules = tuple((name, "data" if name == "batch" else axes) for name, axes in sharding.LOGICAL_RULES)
  assert sharding.batch_axes(rules) == ("data",)
  mesh = sharding.make_mesh((1, 1, 1))
  assert sharding.state_shardings({"step": np.zeros(())}, mesh)["step"].spec == PartitionSpec()
