"""The attention implementations compute the same function (also where queries are split in blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam3i_jax.models.layers import _query_chunk, dot_product_attention


def test_query_chunk_is_a_divisor_within_the_budget():
  assert _query_chunk(5184, 5184) == 1296
  assert _query_chunk(201, 5184) == 201
  assert _query_chunk(3000, 2900) == 1500


@pytest.mark.parametrize("bias_heads", [1, 2])
def test_per_head_query_blocks_equal_batched_attention(bias_heads):
  rng = np.random.default_rng(0)
  b, lq, lk, h, d = 1, 3000, 2900, 2, 8  # 2 query blocks of 1500
  q = jnp.asarray(rng.standard_normal((b, lq, h, d), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((b, lk, h, d), dtype=np.float32))
  v = jnp.asarray(rng.standard_normal((b, lk, h, d), dtype=np.float32))
  bias = jnp.asarray(rng.standard_normal((b, bias_heads, lq, lk), dtype=np.float32))
  mask = jnp.asarray(rng.random((b, lk)) < 0.3)
  attend = jax.jit(dot_product_attention, static_argnames="impl")
  want = attend(q, k, v, bias=bias, key_padding_mask=mask, impl="xla")
  got = attend(q, k, v, bias=bias, key_padding_mask=mask, impl="per_head")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_impl_is_rejected():
  x = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="unknown attention impl"):
    dot_product_attention(x, x, x, impl="flash")
