"""The jitted training step (sam3i_jax.train.step): gradient accumulation.

Accumulating K micro-batches of a batch is the reference's gradient accumulation: each pass is
the loss of its own examples (normalised by its own mean box count, scaled by sqrt of its batch)
and the gradients are averaged. That is the reference run on K times the data-parallel replicas,
so accumulation 2 over micro-batches of 4 (loss_replicas 1) must equal one batch of 8 with
loss_replicas 2 wherever the passes hold equally many boxes (here: every example has two).
Dropout is off (the two runs would draw different masks); plain SGD, so that fp32 rounding in
near-zero gradients is not amplified as Adam's first steps (sign(g) * lr) would amplify it,
after clipping to norm 1 (the random batch's gradients are large).
"""

import jax
import numpy as np
import optax
from flax import nnx

from sam3i_jax import partition
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import Sam3Image, host_counted_rngs
from sam3i_jax.train.sharding import make_mesh
from sam3i_jax.train.step import StepConfig, Trainer
from xla_cpu import FAST_COMPILE

STAGE = 1
BATCH = 8
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6


def batch_of(config, seed: int = 0) -> dict:
  """BATCH examples with two ground-truth objects each (and one padding target slot)."""
  rng = np.random.default_rng(seed)
  s, m, length = config.img_size, config.mask_size, config.context_length
  masks = np.zeros((BATCH, 3, m, m), bool)
  for i in range(BATCH):
    y, x = rng.integers(0, m // 2, 2)
    masks[i, 0, y:y + m // 4, x:x + m // 3] = True
    masks[i, 1, m // 2:, (i % 3) * m // 4:] = True
  return {
      "image": rng.uniform(-1, 1, (BATCH, s, s, 3)).astype(np.float32),
      **{f"tokens_{level}": rng.integers(1, 4000, (BATCH, length)).astype(np.int32)
         for level in ("concept", "simple", "complex")},
      "boxes": rng.uniform(0.2, 0.6, (BATCH, 3, 4)).astype(np.float32),
      "target_valid": np.tile([True, True, False], (BATCH, 1)),
      "masks": masks,
      "concept_id": (np.arange(BATCH) % 3).astype(np.int32),
      "example_valid": np.ones(BATCH, bool),
  }


def train(accum_steps: int, loss_replicas: int, batch: dict, config):
  model = Sam3Image(config, rngs=host_counted_rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))
  trainer = Trainer(model, tx, partition.trainable(STAGE), make_mesh((1, 1, 1)),
                    StepConfig.of_stage(STAGE, accum_steps, num_replicas=loss_replicas),
                    compiler_options=FAST_COMPILE)
  metrics = [jax.device_get(trainer.step(batch)) for _ in range(2)]
  trained = nnx.state(trainer.model(), partition.trainable(STAGE))
  return metrics, {k: np.asarray(v) for k, v in nnx.to_flat_state(trained)}


def test_accumulating_two_micro_batches_of_4_equals_a_batch_of_8():
  jax.config.update("jax_default_matmul_precision", "highest")
  config = get_preset("tiny", adapters=True, dropout=0.0, text_adapter_dropout=0.0,
                      vit_drop_path_rate=0.0)
  batch = batch_of(config)
  want_metrics, want = train(1, 2, batch, config)
  got_metrics, got = train(2, 1, batch, config)
  for step, (w, g) in enumerate(zip(want_metrics, got_metrics), 1):
    assert w.keys() == g.keys()
    for key in ("loss", "simple/loss_ce", "simple/loss_bbox", "simple/loss_mask", "grad_norm"):
      np.testing.assert_allclose(g[key], w[key], rtol=LOSS_RTOL, err_msg=f"step {step} {key}")
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=0, atol=PARAM_ATOL, err_msg=str(key))
  initial = nnx.state(Sam3Image(config, rngs=host_counted_rngs(0)), partition.trainable(STAGE))
  moved = sum(not np.array_equal(np.asarray(v), want[k]) for k, v in nnx.to_flat_state(initial))
  assert moved > len(want) // 2
