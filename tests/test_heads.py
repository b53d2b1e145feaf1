"""Parity of the scoring and segmentation heads (sam3i_jax.models.heads) with Meta's
`dot_prod_scoring` and `segmentation_head`."""

import functools

import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.heads import DotProductScoring, MaskPredictor, SegmentationHead, nearest_resize

PRESETS = ["tiny", "small"]
BATCH, PROMPT_LEN = 2, 7


@functools.lru_cache(maxsize=None)
def _ours(cls, preset: str, prefix: str):
  """An eval_shape-built module filled with the reference weights (no random init)."""
  config, _, sd = parity.reference_model(preset)
  return parity.build(lambda: cls(config, rngs=nnx.Rngs(0)), sd, prefix)


def _prompt(config, rng):
  prompt = rng.standard_normal((BATCH, PROMPT_LEN, config.d_model)).astype(np.float32)
  mask = np.zeros((BATCH, PROMPT_LEN), bool)
  mask[0, 5:] = True
  mask[1, 2:] = True
  return prompt, mask


@pytest.mark.parametrize("preset", PRESETS)
def test_dot_product_scoring_matches_reference(preset):
  config, model, _ = parity.reference_model(preset)
  rng = np.random.default_rng(0)
  prompt, mask = _prompt(config, rng)
  nl, q, d = config.num_dec_layers, config.num_queries, config.d_model
  # Large enough that part of the logits hit the clamp.
  hs = (rng.standard_normal((nl, BATCH, q, d)) * 40).astype(np.float32)
  with torch.no_grad():
    ref = parity.to_numpy(model.dot_prod_scoring(torch.from_numpy(hs), parity.seq_first(prompt),
                                                 torch.from_numpy(mask)))
  clamp = config.logit_clamp
  assert (np.abs(ref) == clamp).any() and (np.abs(ref) < clamp).any()
  scoring = _ours(DotProductScoring, preset, "dot_prod_scoring.")
  ours = parity.fast_jit(lambda m, *a: m(*a), scoring)(jnp.asarray(hs), jnp.asarray(prompt), jnp.asarray(mask))
  assert ours.shape == (nl, BATCH, q, 1)
  parity.assert_close(ours, ref, parity.TOL_SMALL, "logits")
  assert float(jnp.abs(ours).max()) == clamp
  # Padding tokens are ignored: changing them changes nothing.
  prompt2 = np.where(mask[..., None], 100.0, prompt).astype(np.float32)
  ours2 = parity.fast_jit(lambda m, *a: m(*a), scoring)(jnp.asarray(hs), jnp.asarray(prompt2),
                                                  jnp.asarray(mask))
  np.testing.assert_array_equal(ours, ours2)


def _fpn(config, rng):
  g, d = config.grid_size, config.d_model
  return [rng.standard_normal((BATCH, s, s, d)).astype(np.float32) for s in (4 * g, 2 * g, g)]


@pytest.mark.parametrize("preset", PRESETS)
def test_segmentation_head_matches_reference(preset):
  config, model, _ = parity.reference_model(preset)
  rng = np.random.default_rng(1)
  g, d, q, nl = config.grid_size, config.d_model, config.num_queries, config.num_dec_layers
  fpn = _fpn(config, rng)
  hs = rng.standard_normal((nl, BATCH, q, d)).astype(np.float32)
  memory = rng.standard_normal((BATCH, g * g, d)).astype(np.float32)
  prompt, mask = _prompt(config, rng)
  with torch.no_grad():
    ref = model.segmentation_head(
        backbone_feats=[torch.from_numpy(f).permute(0, 3, 1, 2) for f in fpn],
        obj_queries=torch.from_numpy(hs), image_ids=torch.arange(BATCH),
        encoder_hidden_states=parity.seq_first(memory), prompt=parity.seq_first(prompt),
        prompt_mask=torch.from_numpy(mask))
  head = _ours(SegmentationHead, preset, "segmentation_head.")
  masks, semantic = parity.fast_jit(lambda m, *a: m(*a), head)(
      [jnp.asarray(f) for f in fpn], jnp.asarray(hs[-1]), jnp.asarray(memory), jnp.asarray(prompt),
      jnp.asarray(mask))
  m = config.mask_size
  assert masks.shape == (BATCH, q, m, m) and semantic.shape == (BATCH, 1, m, m)
  parity.assert_close(masks, parity.to_numpy(ref["pred_masks"]), parity.TOL_SMALL, "pred_masks")
  parity.assert_close(semantic, parity.to_numpy(ref["semantic_seg"]), parity.TOL_SMALL, "semantic_seg")


def test_predict_masks_uses_the_given_predictor():
  """The mask-embedding step can run with another MaskPredictor (SAM3-I's per-level copies)."""
  config, _, sd = parity.reference_model("tiny")
  head = _ours(SegmentationHead, "tiny", "segmentation_head.")
  other = _ours(MaskPredictor, "tiny", "segmentation_head.mask_predictor.")
  rng = np.random.default_rng(2)
  queries = jnp.asarray(rng.standard_normal((BATCH, 3, config.d_model)), jnp.float32)
  embeds = jnp.asarray(rng.standard_normal((BATCH, 5, 4, config.d_model)), jnp.float32)
  base = head.predict_masks(queries, embeds)
  np.testing.assert_allclose(head.predict_masks(queries, embeds, other), base, rtol=1e-6, atol=1e-6)
  # Reference math: einsum of mask_embed(queries) with the embeddings.
  w = {k: torch.from_numpy(v) for k, v in sd.items()
       if k.startswith("segmentation_head.mask_predictor.")}
  x = torch.from_numpy(np.array(queries))
  for i in range(3):
    x = F.linear(x, w[f"segmentation_head.mask_predictor.mask_embed.layers.{i}.weight"],
                 w[f"segmentation_head.mask_predictor.mask_embed.layers.{i}.bias"])
    x = F.relu(x) if i < 2 else x
  ref = torch.einsum("bqc,bhwc->bqhw", x, torch.from_numpy(np.array(embeds)))
  parity.assert_close(base, parity.to_numpy(ref), parity.TOL_SMALL, "masks")
  # A predictor with different weights gives different masks.
  shifted = nnx.clone(other)
  shifted.mask_embed.layers[2].bias[...] = shifted.mask_embed.layers[2].bias[...] + 1.0
  assert parity.rel_l2(head.predict_masks(queries, embeds, shifted), base) > 1e-3


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((3, 5), (12, 10)), ((6, 6), (4, 9))])
def test_nearest_resize_matches_torch(src, dst):
  x = np.random.default_rng(3).standard_normal((1, *src, 2)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="nearest")
  np.testing.assert_array_equal(nearest_resize(jnp.asarray(x), dst), ref.permute(0, 2, 3, 1).numpy())
