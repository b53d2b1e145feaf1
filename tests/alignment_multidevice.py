"""Run by test_alignment.py in a subprocess with 4 simulated CPU devices.

One example per device (global batch 4): the alignment losses under jit on sharded global arrays,
and inside shard_map with axis_name="data", must equal (value and gradients) the single-device
computation on the same global batch; without the gather (the reference's per-GPU computation)
InfoNCE and the margin collapse to 0. Prints OK on success.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from sam3i_jax.losses.alignment import (alignment_losses, concept_anchor_margin,  # noqa: E402
                                        instance_infonce)

jax.config.update("jax_default_matmul_precision", "highest")

DIFF = ("seg_a", "seg_b", "feat_a", "feat_b", "anchors")


def make_batch(seed, example_valid):
  rng = np.random.default_rng(seed)
  seg_a = (3 * rng.normal(size=(4, 1, 8, 8))).astype(np.float32)
  feat_a = rng.normal(size=(4, 16)).astype(np.float32)
  return dict(
    seg_a=seg_a,
    seg_b=(seg_a + 2 * rng.normal(size=seg_a.shape)).astype(np.float32),
    union_gt=rng.random((4, 16, 16)) < 0.3,  # larger than the logits: upsampled
    feat_a=feat_a,
    feat_b=(feat_a + 2 * rng.normal(size=feat_a.shape)).astype(np.float32),
    anchors=(feat_a + 2 * rng.normal(size=feat_a.shape)).astype(np.float32),
    concept_id=np.array([0, 1, 0, 2], np.int32),
    example_valid=np.array(example_valid, bool))


def loss_and_grads(batch, axis_name=None):
  def total(*diff):
    return alignment_losses(**{**batch, **dict(zip(DIFF, diff))}, axis_name=axis_name)
  return jax.value_and_grad(total, argnums=tuple(range(len(DIFF))), has_aux=True)(
    *(batch[k] for k in DIFF))


def assert_same(ours, ref, what):
  (total, terms), grads = ours
  (ref_total, ref_terms), ref_grads = ref
  np.testing.assert_allclose(total, ref_total, rtol=1e-5, err_msg=f"{what}: total")
  for k in ref_terms:
    np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5, atol=1e-8,
                               err_msg=f"{what}: {k}")
  for name, g, rg in zip(DIFF, grads, ref_grads):
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-6 * np.abs(rg).max(),
                               err_msg=f"{what}: d/d{name}")


def main():
  assert jax.device_count() == 4, jax.devices()
  # Auto axes, as sam3i_jax.train.sharding.make_mesh builds (jax.make_mesh defaults to Explicit)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
  sharded = NamedSharding(mesh, P("data"))
  # the batch split over two mesh axes, as over ("data", "fsdp")
  batch_axes = ("data", "fsdp")
  mesh_2d = jax.make_mesh((2, 2), batch_axes, axis_types=(AxisType.Auto,) * 2)
  sharded_2d = NamedSharding(mesh_2d, P(batch_axes))

  single_device = jax.jit(loss_and_grads)
  mapped = jax.jit(jax.shard_map(
    functools.partial(loss_and_grads, axis_name="data"), mesh=mesh, in_specs=P("data"),
    out_specs=((P(), P()), P("data"))))
  mapped_2d = jax.jit(jax.shard_map(
    functools.partial(loss_and_grads, axis_name=batch_axes), mesh=mesh_2d,
    in_specs=P(batch_axes), out_specs=((P(), P()), P(batch_axes))))

  for seed, valid in ((0, [True] * 4), (1, [True, True, False, True])):
    batch = make_batch(seed, valid)
    single = single_device(batch)
    _, terms = single[0]
    assert float(terms["infonce"]) > 1e-2 and float(terms["margin"]) > 1e-2, terms

    global_batch = jax.device_put(batch, sharded)
    assert_same(single_device(global_batch), single, f"jit, sharded, valid={valid}")
    assert_same(mapped(global_batch), single, f"shard_map, valid={valid}")
    assert_same(mapped_2d(jax.device_put(batch, sharded_2d)), single,
                f"shard_map over {batch_axes}, valid={valid}")

  # The reference's per-GPU computation: with one example per device there is nothing to contrast.
  def per_device(b):
    infonce = instance_infonce(b["feat_a"], b["feat_b"], b["concept_id"], b["example_valid"])
    margin = concept_anchor_margin(b["feat_a"], b["feat_b"], b["anchors"], b["concept_id"],
                                   b["example_valid"])
    return infonce[None], margin[None]
  infonce, margin = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                          out_specs=P("data")))(global_batch)
  # a lone example's InfoNCE is log(exp(S_pos - S_self) + 1e-8) - (S_pos - S_self): ~0, and
  # non-zero only through the reference's 1e-8; no gradient worth the name
  a, b = (x / np.linalg.norm(x, axis=-1, keepdims=True)
          for x in (batch["feat_a"].astype(np.float64), batch["feat_b"]))
  shift = np.sum(a * b, -1) / 0.1 - 1 / 0.1
  lone = np.where(batch["example_valid"], np.log(np.exp(shift) + 1e-8) - shift, 0.0)
  np.testing.assert_allclose(infonce, lone, atol=2e-6)  # float32 rounding at S_self = 10
  assert np.asarray(infonce).max() < 1e-2 * float(terms["infonce"])
  assert not np.asarray(margin).any()
  print("OK")


if __name__ == "__main__":
  main()
