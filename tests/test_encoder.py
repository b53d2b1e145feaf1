"""Parity of the fusion encoder (sam3i_jax.models.encoder) with Meta's `transformer.encoder`."""

import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.encoder import TransformerEncoderFusion

PRESETS = ["tiny", "small"]
PREFIX = "transformer.encoder."
BATCH, PROMPT_LEN = 2, 9


@pytest.mark.parametrize("preset", PRESETS)
def test_fusion_encoder_matches_reference(preset):
  config, model, sd = parity.reference_model(preset)
  rng = np.random.default_rng(0)
  g, d = config.grid_size, config.d_model
  image = rng.standard_normal((BATCH, g * g, d)).astype(np.float32)
  pos = rng.standard_normal((g * g, d)).astype(np.float32)
  prompt = rng.standard_normal((BATCH, PROMPT_LEN, d)).astype(np.float32)
  mask = np.zeros((BATCH, PROMPT_LEN), bool)
  mask[0, 6:] = True  # both rows padded, by different amounts
  mask[1, 2:] = True
  # Called as Sam3Image._run_encoder does: sequence-first lists of one level, with feat_sizes.
  with torch.no_grad():
    ref = model.transformer.encoder(
        src=[parity.seq_first(image)], src_key_padding_mask=None,
        src_pos=[parity.seq_first(np.broadcast_to(pos, image.shape))], prompt=parity.seq_first(prompt),
        prompt_pos=torch.zeros(PROMPT_LEN, BATCH, d), prompt_key_padding_mask=torch.from_numpy(mask),
        feat_sizes=[(g, g)])
  ref = parity.to_numpy(ref["memory"].transpose(0, 1))

  enc = parity.build(lambda: TransformerEncoderFusion(config, rngs=nnx.Rngs(0)), sd, PREFIX)
  fwd = parity.fast_jit(lambda m, *a: m(*a), enc)
  args = (jnp.asarray(prompt), jnp.asarray(mask))
  out = fwd(jnp.asarray(image), jnp.asarray(pos), *args)
  assert out.shape == (BATCH, g * g, d)
  parity.assert_close(out, ref, parity.TOL_SMALL, "memory (L, D) positions")
  out = fwd(jnp.asarray(image), jnp.broadcast_to(pos, image.shape), *args)
  parity.assert_close(out, ref, parity.TOL_SMALL, "memory (B, L, D) positions")
  # The padded prompt tokens are ignored.
  prompt2 = np.where(mask[..., None], -50.0, prompt).astype(np.float32)
  out2 = fwd(jnp.asarray(image), jnp.asarray(pos), jnp.asarray(prompt2), jnp.asarray(mask))
  parity.assert_close(out2, ref, parity.TOL_SMALL, "memory, changed padding")
