"""Checkpoints: state, grain iterator and meta round-trip; keep-N; restore into given shardings."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3i_jax.train.checkpoints import Checkpoints, abstract_with_shardings


def make_iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4))


def test_round_trip_with_data_iterator_and_keep(tmp_path):
  checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(7, jnp.int32)}
  iterator = make_iterator()
  for _ in range(3):
    next(iterator)
  for step in (1, 2, 3):
    checkpoints.save(step, state, iterator, {"stage": 1, "loss": 0.5})
  assert checkpoints.all_steps() == [2, 3] and checkpoints.latest_step() == 3
  expected_next = [np.asarray(next(iterator)) for _ in range(2)]

  fresh = make_iterator()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = abstract_with_shardings(state, jax.tree.map(lambda _: device, state))
  restored, meta = Checkpoints(tmp_path / "ckpt").restore(None, abstract, fresh)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert int(restored["step"]) == 7 and restored["params"]["w"].sharding == device
  assert meta == {"step": 3, "stage": 1, "loss": 0.5}
  for want in expected_next:
    np.testing.assert_array_equal(np.asarray(next(fresh)), want)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    Checkpoints(tmp_path / "empty").restore(None, {})
