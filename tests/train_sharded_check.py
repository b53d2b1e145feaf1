"""Run by test_train_loop.py in a subprocess with 8 simulated CPU devices.

Two training steps of the tiny SAM3-I model (stage 1, dropout and DAC on) on one device and on the
(data, fsdp, tensor) meshes (8,1,1), (2,4,1) and (2,2,2); prints one JSON line: per mesh the
largest relative differences of the losses, gradient norms and updated trainable parameters
against the single-device run, and how many parameters were sharded. Then the (2,4,1) run's train
state is checkpointed and restored onto a trainer on the (2,2,2) mesh: the largest difference of
any leaf, and whether every restored leaf has the new mesh's sharding. Plain SGD: Adam's first
steps are sign(g) * lr, which turns fp32 reduction-order noise in near-zero gradients into
differences of order lr (the optimizer itself is tested against torch in test_train_optimizer.py).
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sam3i_jax import partition  # noqa: E402
from sam3i_jax.models.config import get_preset  # noqa: E402
from sam3i_jax.models.sam3 import Sam3Image, host_counted_rngs  # noqa: E402
from sam3i_jax.train import sharding  # noqa: E402
from sam3i_jax.train.checkpoints import Checkpoints, abstract_with_shardings  # noqa: E402
from sam3i_jax.train.step import StepConfig, Trainer  # noqa: E402
from sam3i_jax.tree_paths import dotted  # noqa: E402
from xla_cpu import FAST_COMPILE  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
STAGE = 1
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))


def make_batch(config, seed: int, batch: int = 8, targets: int = 3) -> dict:
  rng = np.random.default_rng(seed)
  s, m, length = config.img_size, config.mask_size, config.context_length
  masks = np.zeros((batch, targets, m, m), bool)
  masks[:, 0, m // 4:m // 2, m // 4:m // 2] = True
  masks[:, 1, m // 2:, m // 3:] = True
  return {
      "image": rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32),
      **{f"tokens_{level}": rng.integers(1, 4000, (batch, length)).astype(np.int32)
         for level in ("concept", "simple", "complex")},
      "boxes": np.tile(np.float32([[0.375, 0.375, 0.25, 0.25], [0.7, 0.75, 0.6, 0.5],
                                   [0.5, 0.5, 0.2, 0.2]]), (batch, 1, 1)),
      "target_valid": np.tile([True, True, False], (batch, 1)) & (np.arange(batch) % 4 != 3)[:, None],
      "masks": masks,
      "concept_id": (np.arange(batch) % 3).astype(np.int32),
      "example_valid": np.ones(batch, bool),
  }


def make_trainer(mesh, config):
  model = Sam3Image(config, rngs=host_counted_rngs(0))
  # momentum=0.0 is plain SGD with a trace in the optimizer state (the last gradient), so the
  # restore check below has non-zero optimizer leaves to carry over.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.0))
  return Trainer(model, tx, partition.trainable(STAGE), mesh,
                 StepConfig.of_stage(STAGE, num_replicas=2),
                 compiler_options=FAST_COMPILE)


def raw(x) -> np.ndarray:
  """A leaf's values as numpy (a PRNG key as its key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x, np.float64)


def restore_on_other_mesh(saved, mesh, config) -> dict:
  """Saves `saved`'s train state, restores it into a fresh trainer on `mesh`."""
  target = make_trainer(mesh, config)
  with tempfile.TemporaryDirectory() as directory:
    checkpoints = Checkpoints(directory)
    checkpoints.save(2, saved.state)
    checkpoints.wait()
    abstract = abstract_with_shardings(target.state, target.state_shardings)
    restored, _ = Checkpoints(directory).restore(None, abstract)
  pairs = list(zip(jax.tree.leaves(saved.state), jax.tree.leaves(restored)))
  return {"max_abs": max(float(np.abs(raw(a) - raw(b)).max()) for a, b in pairs),
          "leaves": len(pairs),
          "on_target_shardings": all(
              r.sharding == t for r, t in zip(jax.tree.leaves(restored),
                                              jax.tree.leaves(target.state_shardings)))}


def train(mesh, config, batches):
  trainer = make_trainer(mesh, config)
  initial = jax.device_get(nnx.state(trainer.model(), partition.trainable(STAGE)))
  metrics = [trainer.step(batch) for batch in batches]
  losses = [float(m[key]) for m in metrics for key in ("loss", "grad_norm")]
  params = nnx.state(trainer.model(), partition.trainable(STAGE))
  flat = {dotted(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  sharded = sorted(dotted(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
                   if not x.sharding.is_fully_replicated)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(initial), jax.tree.leaves(params)))
  return losses, flat, sharded, moved, trainer


def main():
  config = get_preset("tiny", adapters=True)
  batches = [make_batch(config, seed) for seed in (0, 1)]
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  base_losses, base_params, _, moved, _ = train(single, config, batches)
  report = {"devices": jax.device_count(), "losses": base_losses, "update_max_abs": moved}
  trainers = {}
  for shape in MESHES:
    losses, params, sharded, _, trainers[shape] = train(sharding.make_mesh(shape), config, batches)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
    param_diff = max(float(np.linalg.norm(params[k] - v) / max(np.linalg.norm(v), 1e-12))
                     for k, v in base_params.items())
    moved = max(float(np.abs(params[k] - v).max()) for k, v in base_params.items())
    report[str(shape)] = {"loss_rel": loss_diff, "param_rel_l2": param_diff,
                          "param_max_abs": moved, "sharded_params": len(sharded)}
  report["restore_(2, 4, 1)_on_(2, 2, 2)"] = restore_on_other_mesh(
      trainers[(2, 4, 1)], sharding.make_mesh((2, 2, 2)), config)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
