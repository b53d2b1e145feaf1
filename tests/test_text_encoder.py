"""TextEncoder against the PyTorch VETextEncoder (backbone.language_backbone)."""

import parity  # noqa: F401  (first: applies the sam3_cpu workarounds)

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from sam3i_jax.models.text_encoder import TextEncoder

TEXTS = ["a red car", "the dog sitting on the left of the sofa", "visual",
         "a very long instruction " * 8]  # the last one is truncated to 32 tokens


# These graphs run a few times each: XLA's backend optimisation costs more than it saves.
_jit = functools.partial(jax.jit, compiler_options=parity.FAST_COMPILE)


@_jit
def _apply(model, ids):
  return model(ids)


def _build(preset):
  config, model, sd = parity.reference_model(preset)
  # Abstract init (fast), then every parameter is filled by the strict load.
  ours = nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0)))
  parity.load_into(ours, sd, "backbone.language_backbone.")
  return config, model, ours


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parity(preset):
  config, model, ours = _build(preset)
  tokens = model.backbone.language_backbone.tokenizer(TEXTS, context_length=config.context_length)
  with torch.inference_mode():
    ref = model.backbone.forward_text(TEXTS, device="cpu")
  ids = jax.numpy.asarray(tokens.numpy().astype(np.int32))
  features, pad_mask, embeds = _apply(ours, ids)
  assert features.shape == (len(TEXTS), config.context_length, config.d_model)
  parity.assert_close(features, parity.to_numpy(ref["language_features"]).transpose(1, 0, 2),
                      parity.TOL_SMALL, "language_features")
  np.testing.assert_array_equal(pad_mask, parity.to_numpy(ref["language_mask"]))
  assert pad_mask[0].sum() > 0 and not pad_mask[3].any()  # padded and full-length rows
  parity.assert_close(embeds, parity.to_numpy(ref["language_embeds"]).transpose(1, 0, 2),
                      parity.TOL_SMALL, "language_embeds")


def test_causal_and_shorter_sequences():
  """Token i depends on tokens <= i only, so a prefix of the ids gives the prefix of the output."""
  config, _, ours = _build("tiny")
  ids = np.random.default_rng(0).integers(1, config.vocab_size, (2, config.context_length))
  full = _apply(ours, ids)[0]
  prefix = _apply(ours, ids[:, :9])[0]
  np.testing.assert_allclose(prefix, full[:, :9], rtol=1e-5, atol=1e-5)
  changed = ids.copy()
  changed[:, 20] = 5
  out = _apply(ours, changed)[0]
  np.testing.assert_allclose(out[:, :20], full[:, :20], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out[:, 20:]) - np.asarray(full[:, 20:])).max() > 1e-3
