"""The attention implementations compute the same function (also where queries are split in blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sam3i_jax.models import layers
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


def _qkv(rng, b, lq, lk, h, d):
  q = jnp.asarray(rng.standard_normal((b, lq, h, d), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((b, lk, h, d), dtype=np.float32))
  v = jnp.asarray(rng.standard_normal((b, lk, h, d), dtype=np.float32))
  return q, k, v


def test_blocked_attention_equals_plain_without_dropout():
  rng = np.random.default_rng(1)
  b, lq, lk, h = 2, 1200, 2000, 2  # BLOCKED_LOGITS gives 2 query blocks of 600
  assert layers._query_chunk(lq, lk, layers.BLOCKED_LOGITS) == 600
  q, k, v = _qkv(rng, b, lq, lk, h, 8)
  bias = jnp.asarray(rng.standard_normal((b, h, lq, lk), dtype=np.float32))
  mask = jnp.asarray(rng.random((b, lk)) < 0.3)
  w = jnp.asarray(rng.standard_normal((b, lq, h, 8), dtype=np.float32))

  def loss(impl):
    def f(q, k, v, bias):
      return (dot_product_attention(q, k, v, bias=bias, key_padding_mask=mask, impl=impl) * w).sum()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, bias)

  (want, want_grads), (got, got_grads) = loss("xla"), loss("blocked")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for name, g, g_want in zip("qkvb", got_grads, want_grads):
    np.testing.assert_allclose(g, g_want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_blocked_dropout_equals_plain_arithmetic_with_the_same_masks():
  """With dropout on at a fixed key, the query blocks drop exactly the weights that the whole
  (Lq, Lk) matrix would under the same row masks: values and gradients equal."""
  rng = np.random.default_rng(2)
  b, lq, lk, h = 1, 1200, 2000, 2
  q, k, v = _qkv(rng, b, lq, lk, h, 8)
  drop = layers.RowDropout(jax.random.key(4), 0.1).apply
  w = jnp.asarray(rng.standard_normal((b, lq, h, 8), dtype=np.float32))

  def loss(attend):
    return jax.jit(jax.value_and_grad(lambda q, k, v: (attend(q, k, v) * w).sum(), argnums=(0, 1, 2)))(q, k, v)

  plain = loss(lambda q, k, v: layers._attend(q, k, v, None, None, drop))
  blocked = loss(lambda q, k, v: layers._attend_query_chunks(q, k, v, None, None, drop,
                                                             layers.BLOCKED_LOGITS, remat=True))
  no_dropout = loss(lambda q, k, v: layers._attend(q, k, v, None, None))
  np.testing.assert_allclose(blocked[0], plain[0], rtol=1e-5)
  for name, g, g_want in zip("qkv", blocked[1], plain[1]):
    np.testing.assert_allclose(g, g_want, rtol=1e-4, atol=1e-5, err_msg=name)
  assert abs(float(blocked[0]) - float(no_dropout[0])) > 1e-3 * abs(float(no_dropout[0]))


def test_row_dropout_rate_and_fresh_masks_through_the_module():
  ones = jnp.ones((2, 4, 300, 500))
  dropped = layers.RowDropout(jax.random.key(0), 0.1).apply(ones, 0)
  assert abs(float((dropped == 0).mean()) - 0.1) < 0.005
  np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / 0.9], rtol=1e-6)
  # Rows are masked by their own index: rows 100.. of a block starting there equal the same rows
  # of the whole matrix.
  np.testing.assert_array_equal(layers.RowDropout(jax.random.key(0), 0.1).apply(ones[:, :, :50], 100),
                                dropped[:, :, 100:150])
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, 1, 1200, 2000, 2, 8)
  dropout = nnx.Dropout(0.1, deterministic=False, rngs=nnx.Rngs(0))
  first = dot_product_attention(q, k, v, dropout=dropout, impl="blocked")
  second = dot_product_attention(q, k, v, dropout=dropout, impl="blocked")
  assert np.abs(np.asarray(first - second)).max() > 1e-3  # each call draws new masks
  dropout.deterministic = True
  np.testing.assert_allclose(dot_product_attention(q, k, v, dropout=dropout, impl="blocked"),
                             dot_product_attention(q, k, v, impl="xla"), rtol=1e-5, atol=1e-6)


def test_auto_chooses_for_the_compile_target():
  long_q = jnp.zeros((1, 1200, 2, 8))
  short_q = jnp.zeros((1, 100, 2, 8))
  choose = layers._choose_impl
  with layers.compile_target("tpu"):
    assert choose("auto", long_q, long_q, False, True) == "blocked"
    assert choose("auto", long_q, long_q, False, False) == "blocked"
    assert choose("auto", short_q, short_q, False, False) == "xla"
  with layers.compile_target("cpu"):
    assert choose("auto", long_q, long_q, False, False) == "per_head"
    assert choose("auto", long_q, long_q, False, True) == "blocked"
  with layers.compile_target("gpu"):
    assert choose("auto", long_q.astype(jnp.bfloat16), long_q, False, False) == "cudnn"
    assert choose("auto", long_q, long_q, True, False) == "blocked"
  assert choose("xla", long_q, long_q, False, False) == "xla"
