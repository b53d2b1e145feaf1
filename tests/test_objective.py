"""loss_fn: the per-stage composition of the detection and alignment losses, jit-compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from test_detection import make_batch

from sam3i_jax.losses.alignment import alignment_losses
from sam3i_jax.losses.detection import detection_loss
from sam3i_jax.losses.objective import ObjectiveConfig, loss_fn, union_masks


def stage3_inputs():
  simple, targets = make_batch(0)
  complex_, _ = make_batch(1)
  rng = np.random.default_rng(2)
  b = targets.boxes.shape[0]
  embeddings = {level: rng.normal(size=(b, 8)).astype(np.float32)
                for level in ("simple", "complex", "concept")}
  batch = {**targets._asdict(), "concept_id": np.array([3, 3, 5, 7], np.int32),
           "example_valid": np.array([True, True, True, False])}
  return {"simple": simple, "complex": complex_, "embeddings": embeddings}, batch


def test_union_masks_ignores_padding_targets():
  masks = np.zeros((1, 3, 4, 4), bool)
  masks[0, 0, 0, 0] = masks[0, 1, 1, 1] = masks[0, 2, 2, 2] = True
  union = union_masks({"masks": masks, "target_valid": np.array([[True, False, True]])})
  assert union[0].sum() == 2 and union[0, 0, 0] and union[0, 2, 2] and not union[0, 1, 1]


def test_single_branch_is_the_detection_loss():
  outputs, targets = make_batch(0)
  config = ObjectiveConfig(levels=("complex",), num_replicas=2)
  total, metrics = jax.jit(loss_fn, static_argnums=2, compiler_options=parity.FAST_COMPILE)({"complex": outputs}, targets._asdict(),
                                                      config)
  expected, terms = jax.jit(lambda o, t: detection_loss(o, t, num_replicas=2),
                            compiler_options=parity.FAST_COMPILE)(outputs, targets)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["complex/loss_mask"], terms["loss_mask"], rtol=1e-6)
  assert metrics["loss"] == total
  assert not any(key.startswith(("align/", "simple/")) for key in metrics)


def test_two_branches_add_and_the_alignment_terms_come_with_gradients():
  outputs, batch = stage3_inputs()

  def objective(outs):
    return loss_fn(outs, batch, ObjectiveConfig(levels=("simple", "complex"), alignment=True))

  def by_parts(outs):
    simple, _ = detection_loss(outs["simple"], batch)
    complex_, _ = detection_loss(outs["complex"], batch)
    emb = outs["embeddings"]
    align, terms = alignment_losses(outs["simple"]["semantic_seg"],
                                    outs["complex"]["semantic_seg"], union_masks(batch),
                                    emb["simple"], emb["complex"], emb["concept"],
                                    batch["concept_id"], batch["example_valid"])
    return simple + complex_ + align, (simple, terms)

  (total, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True),
                                            compiler_options=parity.FAST_COMPILE)(outputs)
  (expected, (simple, terms)), _ = jax.jit(jax.value_and_grad(by_parts, has_aux=True),
                                                compiler_options=parity.FAST_COMPILE)(outputs)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["simple/loss"], simple, rtol=1e-6)
  for name in ("kl", "hard", "infonce", "margin"):
    np.testing.assert_allclose(metrics[f"align/{name}"], terms[name], rtol=1e-6)
    assert float(metrics[f"align/{name}"]) != 0.0
  for path in (("simple", "semantic_seg"), ("complex", "pred_masks"), ("embeddings", "simple"),
               ("embeddings", "concept")):
    assert float(jnp.abs(grads[path[0]][path[1]]).sum()) > 0, path


def test_alignment_without_both_branches_and_a_missing_branch_are_rejected():
  with pytest.raises(ValueError, match="alignment terms need the"):
    ObjectiveConfig(levels=("simple",), alignment=True)
  outputs, targets = make_batch(0)
  with pytest.raises(ValueError, match="missing \\['complex'\\]"):
    loss_fn({"simple": outputs}, targets._asdict(),
            ObjectiveConfig(levels=("simple", "complex"), alignment=True))
