"""Parity of the vision backbone (sam3i_jax.models.vit and neck) with Meta's PyTorch SAM 3."""

import itertools

import parity  # noqa: I001  (must precede torch/sam3)
from parity import TOL_SMALL, assert_close, to_numpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.torch_layout import param_table
from sam3i_jax.models.neck import VisionNeck
from sam3i_jax.models.stacking import layer_at
from sam3i_jax.models.vit import ViT, rope_tables

PRESETS = ["tiny", "small"]
PREFIX = "backbone.vision_backbone."


def _build(cls, config):
  """An instance of `cls` with zero parameters and distinct RNG keys, without running the random
  initialisers (compiling them per shape costs seconds on CPU); parameters are loaded afterwards."""
  seeds = itertools.count()

  def fill(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.split(jax.random.key(next(seeds)), x.shape)  # (n,): a stack of layers
    return jnp.zeros(x.shape, x.dtype)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.tree.map(fill, state))


@nnx.jit
def _run(module, x):
  return module(x)


@nnx.jit(static_argnums=2)
def _run_block(block, x, global_attention):
  return block(x, 0.9, global_attention)  # the drop-path keep probability matters only in training


@nnx.jit
def _run_traced_kind(block, x, global_attention):
  return block(x, 0.9, global_attention)


@nnx.jit
def _run_neck(neck, images):
  return neck.trunk(images), neck(images)


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
  """(config, torch model, state dict, our loaded VisionNeck in eval mode)."""
  config, model, sd = parity.reference_model(request.param)
  neck = _build(VisionNeck, config)
  parity.load_into(neck, sd, PREFIX)
  neck.eval()
  return config, model, sd, neck


@pytest.fixture(scope="module")
def forward(setup):
  """Both backbones on the same batch of 2 images: (images NCHW, torch outputs, ours)."""
  config, model, _, neck = setup
  images = np.random.default_rng(1).uniform(-1, 1, (2, 3, config.img_size, config.img_size))
  images = images.astype(np.float32)
  with torch.no_grad():
    trunk_ref = to_numpy(model.backbone.vision_backbone.trunk(torch.from_numpy(images))[-1])
    out = model.backbone.forward_image(torch.from_numpy(images))
  ref = {"trunk": trunk_ref, "fpn": [to_numpy(t) for t in out["backbone_fpn"]],
         "pos": [to_numpy(t) for t in out["vision_pos_enc"]]}
  trunk, (fpn, pos) = _run_neck(neck, jnp.asarray(images.transpose(0, 2, 3, 1)))
  return images, ref, {"trunk": np.asarray(trunk), "fpn": [np.asarray(f) for f in fpn],
                       "pos": [np.asarray(p) for p in pos]}


def test_window_and_global_block(setup):
  config, model, _, neck = setup
  torch_blocks = model.backbone.vision_backbone.trunk.blocks
  window_id = next(i for i in range(config.vit_depth) if i not in config.global_att_blocks)
  global_id = config.global_att_blocks[0]
  g, c = config.grid_size, config.vit_dim
  x = np.random.default_rng(2).normal(size=(2, g, g, c)).astype(np.float32)
  for i, kind in ((window_id, "window"), (global_id, "global")):
    assert torch_blocks[i].window_size == (config.window_size if kind == "window" else 0)
    assert neck.trunk.global_blocks[i] == (kind == "global")
    with torch.no_grad():
      ref = to_numpy(torch_blocks[i](torch.from_numpy(x)))
    block = layer_at(neck.trunk.blocks, i)
    for impl, traced in itertools.product(("per_head", "xla"), (False, True)):
      block.set_attributes(attention_impl=impl)
      # As the trunk's scan runs it (the kind a traced flag, lax.cond) and as a static choice.
      kind_flag = jnp.asarray(kind == "global") if traced else kind == "global"
      ours = (_run_traced_kind if traced else _run_block)(block, jnp.asarray(x), kind_flag)
      assert_close(ours, ref, TOL_SMALL, f"{kind} block {i} ({impl} attention, traced={traced})")


def test_rope_tables_match_freqs_cis(setup):
  config, model, _, neck = setup
  head_dim = config.vit_dim // config.vit_heads
  block = layer_at(neck.trunk.blocks, 0)
  for i, theirs in enumerate(model.backbone.vision_backbone.trunk.blocks):
    is_global = neck.trunk.global_blocks[i]
    side = config.grid_size if is_global else config.window_size
    cos, sin = rope_tables(head_dim, side, side, block.global_rope_scale if is_global else 1.0)
    freqs = theirs.attn.freqs_cis.detach().numpy()
    assert cos.shape == freqs.shape == (side * side, head_dim // 2)
    assert_close(cos, freqs.real, TOL_SMALL, f"block {i} cos")
    assert_close(sin, freqs.imag, TOL_SMALL, f"block {i} sin")
  # Global blocks squeeze the grid into the window's range: the last token sits at x = y = (g-1)*w/g;
  # pair 0 (frequency 1) turns by x, pair head_dim/4 (frequency 1) by y.
  g, w = config.grid_size, config.window_size
  cos, sin = rope_tables(head_dim, g, g, w / g)
  last = (g - 1) * w / g
  for pair in (0, head_dim // 4):
    np.testing.assert_allclose([cos[-1, pair], sin[-1, pair]], [np.cos(last), np.sin(last)], atol=1e-6)


def test_trunk(forward):
  images, ref, ours = forward
  assert ours["trunk"].shape == (2,) + ref["trunk"].shape[2:] + ref["trunk"].shape[1:2]
  assert_close(ours["trunk"].transpose(0, 3, 1, 2), ref["trunk"], TOL_SMALL, "trunk")


def test_neck_levels_and_positions(setup, forward):
  config, *_ = setup
  _, ref, ours = forward
  g, d = config.grid_size, config.d_model
  assert len(ref["fpn"]) == len(ours["fpn"]) == 3 and len(ours["pos"]) == 3
  for i, side in enumerate((4 * g, 2 * g, g)):
    assert ours["fpn"][i].shape == (2, side, side, d)
    assert ours["pos"][i].shape == (side, side, d)
    assert_close(ours["fpn"][i].transpose(0, 3, 1, 2), ref["fpn"][i], TOL_SMALL, f"fpn level {i}")
    pos = np.broadcast_to(ours["pos"][i].transpose(2, 0, 1)[None], ref["pos"][i].shape)
    assert_close(pos, ref["pos"][i], TOL_SMALL, f"position map {i}")


def test_half_scale_branch_exists_but_is_not_used(setup, forward):
  config, model, sd, neck = setup
  table = param_table(neck)
  for name in ("conv_1x1.weight", "conv_1x1.bias", "conv_3x3.weight", "conv_3x3.bias"):
    key = f"convs.3.{name}"
    assert key in table, key
    assert tuple(table[key].param.shape) == tuple(
        np.transpose(sd[PREFIX + key], (2, 3, 1, 0)).shape if key.endswith("weight") else sd[PREFIX + key].shape)
  assert not hasattr(neck.convs[3], "dconv_2x2")
  # It still computes the reference's 0.5x level when called on its own.
  g = config.grid_size
  x = np.random.default_rng(5).normal(size=(2, g, g, config.vit_dim)).astype(np.float32)
  with torch.no_grad():
    ref = to_numpy(model.backbone.vision_backbone.convs[3](torch.from_numpy(x.transpose(0, 3, 1, 2))))
  assert_close(np.asarray(_run(neck.convs[3], jnp.asarray(x))).transpose(0, 3, 1, 2), ref, TOL_SMALL,
               "0.5x branch")
  # Changing convs.3 leaves every output as it was (scalp = 1 drops the 0.5x level).
  images, _, ours = forward
  branch = neck.convs[3]
  saved = nnx.state(branch)
  try:
    branch.conv_1x1.kernel[...] = branch.conv_1x1.kernel[...] + 1.0
    branch.conv_3x3.bias[...] = branch.conv_3x3.bias[...] + 1.0
    _, (fpn, _) = _run_neck(neck, jnp.asarray(images.transpose(0, 2, 3, 1)))
  finally:
    nnx.update(branch, saved)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(fpn[i]), ours["fpn"][i])


def test_drop_path_only_in_training():
  config, _, sd = parity.reference_model("tiny")
  config = config.replace(vit_drop_path_rate=0.5)
  vit = _build(ViT, config)
  parity.load_into(vit, sd, PREFIX + "trunk.")
  np.testing.assert_allclose(vit.drop_path_rates, np.linspace(0, 0.5, config.vit_depth))
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, config.img_size, config.img_size, 3)),
                  jnp.float32)
  vit.eval()
  reference = np.asarray(_run(vit, x))
  vit.train()
  first, second = np.asarray(_run(vit, x)), np.asarray(_run(vit, x))
  assert np.abs(first - reference).max() > 1e-3  # some residual branch was dropped
  assert np.abs(first - second).max() > 1e-3  # fresh masks on each call
  vit.eval()
  np.testing.assert_array_equal(np.asarray(_run(vit, x)), reference)
  # A block whose drop rate is 1 (keep 0) drops both residual branches: the identity in training.
  block = layer_at(vit.blocks, config.vit_depth - 1)
  block.train()
  h = jnp.asarray(np.random.default_rng(4).normal(size=(2, config.grid_size, config.grid_size,
                                                         config.vit_dim)), jnp.float32)
  run = nnx.jit(lambda block, h, keep: block(h, keep, True))
  np.testing.assert_array_equal(np.asarray(run(block, h, 0.0)), np.asarray(h))
  block.eval()
  assert np.abs(np.asarray(run(block, h, 0.0)) - np.asarray(h)).max() > 1e-3
