"""Parity of the SAM 3 decoder (sam3i_jax.models.decoder) with Meta's `transformer.decoder`."""

import copy
import functools

import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.decoder import TransformerDecoder, TransformerDecoderLayer, inverse_sigmoid
from sam3i_jax.models.stacking import layer_at

PRESETS = ["tiny", "small"]
PREFIX = "transformer.decoder."
BATCH, PROMPT_LEN = 2, 7


def _inputs(config, seed: int = 0, grid=None):
  """Random fused image tokens, positions, prompt and a prompt mask with padding in both rows."""
  rng = np.random.default_rng(seed)
  h, w = grid or (config.grid_size, config.grid_size)
  d = config.d_model
  memory = rng.standard_normal((BATCH, h * w, d)).astype(np.float32)
  pos = rng.standard_normal((h * w, d)).astype(np.float32)
  prompt = rng.standard_normal((BATCH, PROMPT_LEN, d)).astype(np.float32)
  mask = np.zeros((BATCH, PROMPT_LEN), bool)
  mask[0, 5:] = True
  mask[1, 3:] = True
  return memory, pos, prompt, mask, (h, w)


@functools.lru_cache(maxsize=None)
def _ours(preset: str, dtype: str = "float32") -> TransformerDecoder:
  """Our decoder with the reference weights, in eval mode; dropout rate 0 for the DAC test (in eval
  mode the rate does not matter). Cached: tests must not mutate it (use nnx.view)."""
  config, _, sd = parity.reference_model(preset)
  config = config.replace(dropout=0.0, dtype=dtype)
  return parity.build(lambda: TransformerDecoder(config, rngs=nnx.Rngs(0)), sd, PREFIX)


def _run(dec, memory, pos, prompt, mask, grid):
  return parity.fast_jit(lambda m, *a: m(*a, grid), dec)(*(jnp.asarray(x) for x in (memory, pos, prompt, mask)))


def _torch_decoder(tdec, memory, pos, prompt, mask, grid, apply_dac=False):
  """Calls the reference decoder as Sam3Image._run_decoder does; returns batch-first outputs."""
  b = memory.shape[0]
  tgt = tdec.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
  hs, refs, presence, feats = tdec(
      tgt=tgt, memory=parity.seq_first(memory), memory_key_padding_mask=None,
      pos=parity.seq_first(np.broadcast_to(pos, memory.shape)), reference_boxes=None,
      level_start_index=torch.zeros(1, dtype=torch.long), spatial_shapes=torch.tensor([list(grid)]),
      valid_ratios=torch.ones(b, 1, 2), tgt_mask=None, memory_text=parity.seq_first(prompt),
      text_attention_mask=torch.from_numpy(mask), apply_dac=apply_dac)
  return hs.transpose(1, 2), refs.transpose(1, 2), presence.transpose(1, 2), feats.transpose(0, 1)


def _compare(ours: dict, ref, tol=parity.TOL_SMALL, tag=""):
  hs, refs, presence, feats = (parity.to_numpy(t) for t in ref)
  parity.assert_close(ours["hs"], hs, tol, f"{tag}hs")
  parity.assert_close(ours["ref_boxes"], refs, tol, f"{tag}ref_boxes")
  parity.assert_close(ours["presence_logits"], presence, tol, f"{tag}presence_logits")
  parity.assert_close(ours["presence_feats"], feats, tol, f"{tag}presence_feats")


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_matches_reference(preset):
  config, model, sd = parity.reference_model(preset)
  memory, pos, prompt, mask, grid = _inputs(config)
  with torch.no_grad():
    ref = _torch_decoder(model.transformer.decoder, memory, pos, prompt, mask, grid)
  dec = _ours(preset)
  assert dec.deterministic  # eval mode by default
  q, nl = config.num_queries, config.num_dec_layers
  out = _run(dec, memory, pos, prompt, mask, grid)
  assert out["hs"].shape == (nl, BATCH, q, config.d_model)
  assert out["ref_boxes"].shape == (nl, BATCH, q, 4)
  assert out["presence_logits"].shape == (nl, BATCH, 1)
  assert out["presence_feats"].shape == (BATCH, 1, config.d_model)
  _compare(out, ref)
  # Final boxes as Sam3Image._update_scores_and_boxes computes them.
  tdec = model.transformer.decoder
  with torch.no_grad():
    boxes_ref = torch.sigmoid(tdec.bbox_embed(ref[0]) + _torch_inverse_sigmoid(ref[1]))
  boxes = parity.fast_jit(lambda m, hs, r: m.refine(r, hs), dec)(out["hs"], out["ref_boxes"])
  parity.assert_close(boxes, parity.to_numpy(boxes_ref), parity.TOL_SMALL, "boxes")


def _torch_inverse_sigmoid(x):
  from sam3.model.model_misc import inverse_sigmoid as ref_inverse_sigmoid
  return ref_inverse_sigmoid(x)


def test_inverse_sigmoid_matches_reference():
  x = np.array([-0.5, 0.0, 1e-4, 0.3, 0.5, 0.9999, 1.0, 2.0], np.float32)
  parity.assert_close(inverse_sigmoid(jnp.asarray(x)),
                      parity.to_numpy(_torch_inverse_sigmoid(torch.from_numpy(x))), 1e-7)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dac", [False, True])
def test_decoder_layer_matches_reference(preset, dac):
  config, model, sd = parity.reference_model(preset)
  memory, pos, prompt, mask, grid = _inputs(config, seed=1)
  rng = np.random.default_rng(2)
  b, n, d, heads, length = BATCH, config.num_queries, config.d_model, config.num_heads, memory.shape[1]
  tgt = rng.standard_normal((b, n, d)).astype(np.float32)
  qpos = rng.standard_normal((b, n, d)).astype(np.float32)
  presence = rng.standard_normal((b, 1, d)).astype(np.float32)
  bias = rng.standard_normal((b, heads, n, length)).astype(np.float32)
  pos_b = rng.standard_normal(memory.shape).astype(np.float32)  # per-batch positions
  tlayer = model.transformer.decoder.layers[-1]
  with torch.no_grad():
    out_ref, pres_ref = tlayer(
        tgt=parity.seq_first(tgt), tgt_query_pos=parity.seq_first(qpos), memory_text=parity.seq_first(prompt),
        text_attention_mask=torch.from_numpy(mask), memory=parity.seq_first(memory),
        memory_pos=parity.seq_first(pos_b), cross_attn_mask=torch.from_numpy(bias).flatten(0, 1),
        dac=dac, dac_use_selfatt_ln=True, presence_token=parity.seq_first(presence))
  layer = layer_at(_ours(preset).layers, config.num_dec_layers - 1)
  assert isinstance(layer, TransformerDecoderLayer)
  out, pres = parity.fast_jit(lambda m, *a: m(*a, dac=dac), layer)(
      *(jnp.asarray(x) for x in (tgt, qpos, presence, prompt, mask, memory, pos_b, bias)))
  parity.assert_close(out, parity.to_numpy(out_ref.transpose(0, 1)), parity.TOL_SMALL, "tgt")
  parity.assert_close(pres, parity.to_numpy(pres_ref.transpose(0, 1)), parity.TOL_SMALL, "presence")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("grid", [None, (4, 6)])
def test_rpb_matrix_matches_reference(preset, grid):
  config, model, sd = parity.reference_model(preset)
  grid = grid or (config.grid_size, config.grid_size)
  rng = np.random.default_rng(3)
  # Boxes partly outside the image too, as early refinement steps produce.
  boxes = np.concatenate([rng.uniform(0, 1, (BATCH, config.num_queries, 2)),
                          rng.uniform(0.01, 1.2, (BATCH, config.num_queries, 2))], -1).astype(np.float32)
  with torch.no_grad():
    ref = model.transformer.decoder._get_rpb_matrix(parity.seq_first(boxes), grid)
  ours = parity.fast_jit(lambda m, b: m.rpb_matrix(b, grid), _ours(preset))(jnp.asarray(boxes))
  assert ours.shape == (BATCH, config.num_heads, config.num_queries, grid[0] * grid[1])
  parity.assert_close(ours, parity.to_numpy(ref), parity.TOL_SMALL, "rpb")


def _no_dropout_train_copy(tdec):
  """A training-mode copy of the reference decoder with every dropout probability 0."""
  tdec = copy.deepcopy(tdec).train()
  for m in tdec.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
    if isinstance(m, torch.nn.MultiheadAttention):
      m.dropout = 0.0
  assert tdec.use_act_checkpoint  # the reference asserts it in training
  return tdec


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_dac_training_mode(preset):
  config, model, sd = parity.reference_model(preset)
  memory, pos, prompt, mask, grid = _inputs(config)
  pos = np.broadcast_to(pos, memory.shape)  # per-batch positions
  tdec = _no_dropout_train_copy(model.transformer.decoder)
  with torch.no_grad():
    ref = _torch_decoder(tdec, memory, pos, prompt, mask, grid, apply_dac=True)
    ref_eval = _torch_decoder(model.transformer.decoder, memory, pos, prompt, mask, grid)
  dec = nnx.view(_ours(preset), deterministic=False)  # training mode (as train() would set)
  assert not dec.deterministic and not layer_at(dec.layers, 0).dropout1.deterministic
  out = _run(dec, memory, pos, prompt, mask, grid)
  q = config.num_queries
  assert out["hs"].shape == (config.num_dec_layers, BATCH, 2 * q, config.d_model)
  _compare(out, ref, tag="dac ")
  for half, sl in (("o2o", slice(0, q)), ("o2m", slice(q, 2 * q))):
    parity.assert_close(out["hs"][:, :, sl], parity.to_numpy(ref[0])[:, :, sl], parity.TOL_SMALL,
                        f"hs {half}")
    parity.assert_close(out["ref_boxes"][:, :, sl], parity.to_numpy(ref[1])[:, :, sl],
                        parity.TOL_SMALL, f"ref_boxes {half}")
  # The one-to-one half of training is the eval-mode decoder; the one-to-many half is not.
  parity.assert_close(out["hs"][:, :, :q], parity.to_numpy(ref_eval[0]), parity.TOL_SMALL, "o2o == eval")
  assert parity.rel_l2(out["hs"][:, :, q:], parity.to_numpy(ref_eval[0])) > 1e-2


def test_decoder_gradients_match_reference():
  """Where the reference detaches (the next layer's refs only) decides every box gradient."""
  config, model, sd = parity.reference_model("tiny")
  memory, pos, prompt, mask, grid = _inputs(config, seed=5)
  rng = np.random.default_rng(6)
  nl, q = config.num_dec_layers, config.num_queries
  w_box = rng.standard_normal((nl, BATCH, q, 4)).astype(np.float32)
  w_pres = rng.standard_normal((nl, BATCH, 1)).astype(np.float32)
  names = ["reference_points.weight", "query_embed.weight", "bbox_embed.layers.0.weight",
           "layers.0.self_attn.in_proj_weight", "presence_token.weight"]
  tdec = model.transformer.decoder
  params = dict(tdec.named_parameters())
  hs, refs, presence, _ = _torch_decoder(tdec, memory, pos, prompt, mask, grid)
  boxes = torch.sigmoid(tdec.bbox_embed(hs) + _torch_inverse_sigmoid(refs))
  loss = (boxes * torch.from_numpy(w_box)).sum() + (presence * torch.from_numpy(w_pres)).sum()
  grads_ref = torch.autograd.grad(loss, [params[n] for n in names])

  dec = _ours("tiny")

  graphdef, params, rest = nnx.split(dec, nnx.Param, ...)

  def loss_fn(params, *args):
    m = nnx.merge(graphdef, params, rest)
    out = m(*args, grid)
    boxes = m.refine(out["ref_boxes"], out["hs"])
    return (boxes * w_box).sum() + (out["presence_logits"] * w_pres).sum()

  grads = jax.jit(jax.grad(loss_fn), compiler_options=parity.FAST_COMPILE)(
      params, *(jnp.asarray(x) for x in (memory, pos, prompt, mask)))
  ours = {
      "reference_points.weight": grads["reference_points"]["embedding"][...],
      "query_embed.weight": grads["query_embed"]["embedding"][...],
      "bbox_embed.layers.0.weight": grads["bbox_embed"]["layers"][0]["kernel"][...].T,
      "layers.0.self_attn.in_proj_weight": grads["layers"]["self_attn"]["in_proj"]["kernel"][...][0].T,
      "presence_token.weight": grads["presence_token"]["embedding"][...],
  }
  for name, g_ref in zip(names, grads_ref):
    parity.assert_close(ours[name], parity.to_numpy(g_ref), parity.TOL_SMALL, f"grad {name}")


def test_decoder_bfloat16_keeps_ffn_and_boxes_in_float32():
  config, _, sd = parity.reference_model("tiny")
  memory, pos, prompt, mask, grid = _inputs(config)
  dec = _ours("tiny", "bfloat16")
  first = layer_at(dec.layers, 0)
  assert first.linear1.dtype == jnp.float32 and first.norm1.dtype == jnp.bfloat16
  dec.train()  # train() (like nnx.view) switches DAC on, eval() off again
  assert not dec.deterministic and not layer_at(dec.layers, 0).dropout4.deterministic
  dec.eval()
  assert dec.deterministic
  out = _run(dec, memory, pos, prompt, mask, grid)
  assert out["hs"].dtype == jnp.bfloat16 and out["ref_boxes"].dtype == jnp.float32
  with torch.no_grad():
    ref = _torch_decoder(_model_decoder("tiny"), memory, pos, prompt, mask, grid)
  # bfloat16 activations: close to float32, not equal.
  assert 1e-4 < parity.rel_l2(out["hs"], parity.to_numpy(ref[0])) < 5e-2
  assert parity.rel_l2(out["ref_boxes"], parity.to_numpy(ref[1])) < 2e-2


def _model_decoder(preset):
  return parity.reference_model(preset)[1].transformer.decoder


def test_presence_logits_are_not_clamped():
  """The reference's presence clamp is not in place and its result is dropped: logits pass +-10."""
  config, model, sd = parity.reference_model("tiny")
  memory, pos, prompt, mask, grid = _inputs(config, seed=7)
  tdec = copy.deepcopy(model.transformer.decoder)
  with torch.no_grad():
    for p in tdec.presence_token_head.layers[2].parameters():
      p.mul_(1000.0)
    ref = _torch_decoder(tdec, memory, pos, prompt, mask, grid)
  assert np.abs(parity.to_numpy(ref[2])).max() > 10.0
  state = {PREFIX + k: v.detach().numpy() for k, v in tdec.state_dict().items()}
  dec = parity.build(lambda: TransformerDecoder(config, rngs=nnx.Rngs(0)), state, PREFIX)
  out = _run(dec, memory, pos, prompt, mask, grid)
  parity.assert_close(out["presence_logits"], parity.to_numpy(ref[2]), parity.TOL_SMALL, "presence")
