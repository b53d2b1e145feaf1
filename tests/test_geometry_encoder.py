"""GeometryEncoder against the PyTorch SequenceGeometryEncoder (geometry_encoder.)."""

import parity  # noqa: F401  (first: applies the sam3_cpu workarounds)

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from sam3.model.geometry_encoders import Prompt

from sam3i_jax.models.geometry_encoder import GeometryEncoder, concat_padded
from sam3i_jax.models.position_encoding import sine_map

BATCH = 2
# Per case: boxes (B, N, 4) cxcywh, labels (B, N) True = positive, mask (B, N) True = padding.
BOXES = {
    1: [[[0.5, 0.5, 0.3, 0.4]], [[0.3, 0.6, 0.2, 0.25]]],
    3: [[[0.5, 0.45, 0.3, 0.4], [0.06, 0.9, 0.3, 0.4], [0.7, 0.3, 0.12, 0.05]],  # 2nd crosses 2 borders
        [[0.95, 0.2, 0.3, 0.5], [0.4, 0.5, 0.8, 0.9], [0.33, 0.66, 0.02, 0.01]]],  # 1st crosses, 3rd tiny
}
LABELS = {1: [[True], [False]], 3: [[True, False, True], [False, True, True]]}


# These graphs run a few times each: XLA's backend optimisation costs more than it saves.
_jit = functools.partial(jax.jit, compiler_options=parity.FAST_COMPILE)


@_jit
def _apply(model, boxes, labels, mask, feats, pos):
  return model(boxes, labels, mask, feats, pos)


@_jit
def _apply_points(model, boxes, labels, mask, feats, pos, points, point_labels, point_mask):
  return model(boxes, labels, mask, feats, pos, points=points, point_labels=point_labels,
               point_mask=point_mask)


def _build(preset):
  config, model, sd = parity.reference_model(preset)
  # Abstract init (fast), then every parameter is filled by the strict load.
  ours = nnx.eval_shape(lambda: GeometryEncoder(config, rngs=nnx.Rngs(0)))
  parity.load_into(ours, sd, "geometry_encoder.")
  assert all(layer.dropout1.deterministic for layer in ours.encode)  # eval mode until .train()
  assert not model.geometry_encoder.training
  return config, model.geometry_encoder, ours


def _image(config, seed=0):
  g, d = config.grid_size, config.d_model
  feats = np.random.default_rng(seed).standard_normal((BATCH, g, g, d)).astype(np.float32)
  return feats, sine_map(g, g, d)


def _torch_geo(geo, feats, pos, boxes, labels, mask, points=None, point_labels=None, point_mask=None):
  """Calls the reference as Sam3Image._encode_prompt does (sequence-first)."""
  b, h, w, d = feats.shape
  img = [torch.from_numpy(feats).reshape(b, h * w, d).transpose(0, 1)]
  img_pos = [torch.from_numpy(np.broadcast_to(pos, feats.shape).copy()).reshape(b, h * w, d)
             .transpose(0, 1)]
  kwargs = dict(box_embeddings=torch.from_numpy(boxes).transpose(0, 1).contiguous(),
                box_mask=torch.from_numpy(mask),
                box_labels=torch.from_numpy(labels).transpose(0, 1).contiguous())
  if points is not None:
    kwargs.update(point_embeddings=torch.from_numpy(points).transpose(0, 1).contiguous(),
                  point_mask=torch.from_numpy(point_mask),
                  point_labels=torch.from_numpy(point_labels).long().transpose(0, 1).contiguous())
  with torch.inference_mode():
    out, out_mask = geo(Prompt(**kwargs), img, [(h, w)], img_pos)
  return parity.to_numpy(out).transpose(1, 0, 2), parity.to_numpy(out_mask)


def _case(n):
  if n == 0:
    return (np.zeros((BATCH, 0, 4), np.float32), np.zeros((BATCH, 0), bool),
            np.zeros((BATCH, 0), bool))
  return (np.array(BOXES[n], np.float32), np.array(LABELS[n], bool), np.zeros((BATCH, n), bool))


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("num_boxes", [0, 1, 3])
def test_parity(preset, num_boxes):
  config, geo, ours = _build(preset)
  feats, pos = _image(config)
  boxes, labels, mask = _case(num_boxes)
  ref, ref_mask = _torch_geo(geo, feats, pos, boxes, labels, mask)
  tokens, pad_mask = _apply(ours, boxes, labels, mask, feats, pos)
  assert tokens.shape == (BATCH, num_boxes + 1, config.d_model)
  np.testing.assert_array_equal(pad_mask, ref_mask)
  parity.assert_close(tokens, ref, parity.TOL_SMALL, f"geometry tokens ({num_boxes} boxes)")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parity_padded_with_points(preset):
  """Right-padded point and box prompts (row 1: 1 of 2 points, 2 of 3 boxes) against the reference."""
  config, geo, ours = _build(preset)
  feats, pos = _image(config, seed=1)
  boxes, labels, _ = _case(3)
  mask = np.array([[False, False, False], [False, False, True]])
  boxes[1, 2] = 0.0  # the reference keeps padded boxes' values in padded slots; ours zeroes them
  points = np.array([[[0.2, 0.7], [0.99, 0.01]], [[0.5, 0.5], [0.0, 0.0]]], np.float32)
  point_labels = np.array([[1, 0], [1, 1]], np.int32)
  point_mask = np.array([[False, False], [False, True]])
  ref, ref_mask = _torch_geo(geo, feats, pos, boxes, labels, mask, points, point_labels, point_mask)
  tokens, pad_mask = _apply_points(ours, boxes, labels, mask, feats, pos, points, point_labels,
                                   point_mask)
  np.testing.assert_array_equal(pad_mask, ref_mask)
  # Valid tokens first (points, boxes, CLS), then the padding.
  assert pad_mask.tolist() == [[False] * 6, [False] * 4 + [True] * 2]
  parity.assert_close(tokens, ref, parity.TOL_SMALL, "geometry tokens (padded points + boxes)")


def test_padding_does_not_change_valid_outputs():
  """N=3 with the last box masked (garbage, even NaN) == N=2 on the valid tokens."""
  config, _, ours = _build("tiny")
  feats, pos = _image(config, seed=2)
  boxes, labels, _ = _case(3)
  two = _apply(ours, boxes[:, :2], labels[:, :2], np.zeros((BATCH, 2), bool), feats, pos)
  boxes[:, 2] = [[np.nan, 0.5, 7.0, -3.0], [0.1, 0.2, 0.3, 0.4]]
  three = _apply(ours, boxes, labels, np.array([[False, False, True]] * BATCH), feats, pos)
  assert np.isfinite(np.asarray(three[0])).all()
  np.testing.assert_array_equal(three[1][:, :3], two[1])
  assert three[1][:, 3].all()
  np.testing.assert_allclose(three[0][:, :3], two[0], rtol=1e-5, atol=1e-6)
  # ...while an unmasked third box does change them.
  boxes[:, 2] = [[0.6, 0.5, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4]]
  other = _apply(ours, boxes, labels, np.zeros((BATCH, 3), bool), feats, pos)
  assert np.abs(np.asarray(other[0][:, :2]) - np.asarray(two[0][:, :2])).max() > 1e-3


def test_concat_padded():
  seq1 = jnp.arange(2 * 3, dtype=jnp.float32).reshape(2, 3, 1) + 1
  mask1 = jnp.array([[False, False, True], [True, True, True]])
  seq2 = -jnp.arange(2 * 2, dtype=jnp.float32).reshape(2, 2, 1) - 1
  mask2 = jnp.array([[False, True], [False, False]])
  out, mask = concat_padded(seq1, mask1, seq2, mask2)
  assert out[..., 0].tolist() == [[1, 2, -1, -2, 0], [-3, -4, 6, 0, 0]]
  assert mask.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]
