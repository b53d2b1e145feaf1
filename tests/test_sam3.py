"""End-to-end parity of Sam3Image.forward_grounding with Meta's PyTorch SAM 3 (PyPI sam3==0.1.4).

Small presets here; the full-size run is in test_full_size.py. Tolerance: relative L2 <= 1e-5 at float32
with highest matmul precision, and identical kept-mask sets after post-processing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
import sam3_cpu
from flax import nnx

from convert.sam3 import IGNORED_GROUPS
from convert.torch_layout import load_state_dict
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import Sam3Image, host_counted_rngs

TEXTS = ["a red car", "the helmet of the rider on the black horse"]
BOXES = [[0.5, 0.5, 0.2, 0.3], [0.85, 0.15, 0.4, 0.5]]  # the second crosses the image border



def flax_model(preset: str):
  config, torch_model, state_dict = parity.reference_model(preset)
  model = Sam3Image(config, rngs=nnx.Rngs(0))
  load_state_dict(model, dict(state_dict), ignore=IGNORED_GROUPS)
  model.eval()
  return config, torch_model, model


@functools.partial(jax.jit, compiler_options=parity.FAST_COMPILE)
def forward(model, images, token_ids, boxes=None, labels=None, mask=None):
  return model(images, token_ids, boxes, labels, mask)


def nhwc(image_nchw) -> jnp.ndarray:
  return jnp.asarray(np.transpose(image_nchw, (0, 2, 3, 1)))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_text_prompts_match_reference(preset):
  config, torch_model, model = flax_model(preset)
  image = sam3_cpu.random_image(torch_model, seed=3)
  ref = sam3_cpu.run_text(torch_model, image, TEXTS)
  images = jnp.repeat(nhwc(image), len(TEXTS), axis=0)
  ours = forward(model, images, jnp.asarray(ref["input.text_tokens"]))
  assert ours["pred_masks"].shape == (2, config.num_queries, config.mask_size, config.mask_size)
  parity.assert_outputs_match(ours, ref, parity.TOL_SMALL)
  parity.assert_same_kept_sets({k: v[:1] for k, v in ours.items()}, {k: v[:1] for k, v in ref.items()})


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_text_and_two_boxes_match_reference(preset):
  config, torch_model, model = flax_model(preset)
  image = sam3_cpu.random_image(torch_model, seed=4)
  ref = sam3_cpu.run_text_box(torch_model, image, TEXTS[1], BOXES, labels=[True, False])
  ours = forward(model, nhwc(image), jnp.asarray(ref["input.text_tokens"]),
                 jnp.asarray([BOXES], jnp.float32), jnp.asarray([[True, False]]), jnp.zeros((1, 2), bool))
  parity.assert_outputs_match(ours, ref, parity.TOL_SMALL)
  parity.assert_same_kept_sets(ours, ref)


def test_padded_box_prompt_equals_unpadded():
  """A masked padding box changes nothing (predict pads box prompts to fixed buckets)."""
  _, torch_model, model = flax_model("tiny")
  images = nhwc(sam3_cpu.random_image(torch_model, seed=5))
  tokens = jnp.asarray(sam3_cpu.run_text(torch_model, sam3_cpu.random_image(torch_model), "a dog")["input.text_tokens"])
  one = forward(model, images, tokens, jnp.asarray([BOXES[:1]]), jnp.asarray([[True]]), jnp.zeros((1, 1), bool))
  padded = forward(model, images, tokens, jnp.asarray([[BOXES[0], [0.5, 0.5, 1.0, 1.0]]]),
                   jnp.asarray([[True, False]]), jnp.asarray([[False, True]]))
  for name in parity.COMPARED:
    np.testing.assert_allclose(padded[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_training_mode_outputs():
  """Training adds per-layer aux outputs and the one-to-many (DAC) queries; eval has neither."""
  config, torch_model, model = flax_model("tiny")
  images = nhwc(sam3_cpu.random_image(torch_model, seed=6))
  tokens = jnp.asarray(sam3_cpu.run_text(torch_model, sam3_cpu.random_image(torch_model), "a dog")["input.text_tokens"])
  model.train()
  out = forward(model, images, tokens)
  q = config.num_queries
  assert len(out["aux_outputs"]) == config.num_dec_layers - 1
  assert out["pred_logits_o2m"].shape == (1, q, 1) and out["pred_masks_o2m"].shape[1] == q
  assert set(out["aux_outputs"][0]) == {"pred_logits", "pred_boxes", "pred_boxes_xyxy", "presence_logit"}
  model.eval()
  assert "aux_outputs" not in forward(model, images, tokens)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  config, torch_model, model = flax_model("tiny")
  _, _, state_dict = parity.reference_model("tiny")
  bf16 = parity.build(lambda: Sam3Image(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0)), state_dict, "")
  bf16.eval()
  assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
  images = nhwc(sam3_cpu.random_image(torch_model, seed=8))
  tokens = jnp.asarray(sam3_cpu.run_text(torch_model, sam3_cpu.random_image(torch_model), "a dog")["input.text_tokens"])
  full, half = forward(model, images, tokens), forward(bf16, images, tokens)
  assert half["pred_masks"].dtype == jnp.bfloat16
  for name in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit"):
    err = parity.rel_l2(np.asarray(half[name], np.float32), full[name])
    assert err < 5e-2, f"{name}: bf16 vs fp32 relative error {err:.3g}"


def test_host_counted_rngs_initialise_like_nnx_rngs_every_time():
  """The host counter gives nnx.Rngs' keys, and the same ones on every build: an in-place counter
  that JAX read zero-copy once raced the key derivation (different weights from one seed)."""
  config = get_preset("tiny", adapters=True)
  want = jax.tree.leaves(nnx.state(Sam3Image(config, rngs=nnx.Rngs(3)), nnx.Param))
  for _ in range(3):
    got = jax.tree.leaves(nnx.state(Sam3Image(config, rngs=host_counted_rngs(3)), nnx.Param))
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
