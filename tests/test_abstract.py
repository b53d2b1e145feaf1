"""abstract_model: the same shapes as nnx.eval_shape, and jax's Tracer left as it was."""

import jax
from flax import nnx
from jax._src import core as jax_core

from sam3i_jax.abstract import abstract_model
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import Sam3Image


def test_abstract_model_equals_eval_shape_and_restores_tracer():
  original = jax_core.Tracer.sharding
  build = lambda: Sam3Image(get_preset("small"), rngs=nnx.Rngs(0))  # noqa: E731
  fast, slow = abstract_model(build), nnx.eval_shape(build)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))  # noqa: E731
  assert shapes(fast) == shapes(slow)
  assert jax_core.Tracer.sharding is original
