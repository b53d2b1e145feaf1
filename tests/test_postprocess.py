"""Post-processing against Sam3Processor._forward_grounding (run on synthetic model outputs)."""

import jax
import numpy as np
import parity  # noqa: F401  (must precede torch/sam3)
import pytest
import torch
import torch.nn.functional as F
from sam3.model.sam3_image_processor import Sam3Processor

from sam3i_jax.evaluation import postprocess as post
from sam3i_jax.resize import resize_logits, resize_logits_np

# (queries, mask size, original (H, W)): upscale, odd sizes, shrink (no antialias), identity.
CASES = [(40, 72, (100, 150)), (24, 64, (333, 517)), (32, 72, (40, 30)), (16, 72, (72, 72)),
         (200, 32, (47, 61)), (8, 288, (480, 640))]
# torch's CPU bilinear takes another code path for small outputs (< ~3000 pixels), where our
# resize is an ulp or two off instead of bit-exact.
SMALL_OUTPUT = 3000


class _FakeModel:
  """Stands in for Sam3Image: `forward_grounding` returns fixed outputs."""

  def __init__(self, outputs):
    self.outputs = outputs

  def forward_grounding(self, **kwargs):
    return self.outputs


def _outputs(q: int, m: int, seed: int, presence: float = 1.5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 2.0, (1, q, 1)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (1, q, 2)), rng.uniform(0.05, 0.5, (1, q, 2))],
                         -1).astype(np.float32)
  masks = rng.normal(0.0, 3.0, (1, q, m, m)).astype(np.float32)
  masks[:, :, : m // 4] = 0.0  # exact zeros: the "> 0" decision must agree there too
  pres = np.array([[presence]], np.float32)
  return logits, boxes, masks, pres


def _reference(logits, boxes, masks, presence, hw, threshold=0.5):
  """The processor's own _forward_grounding, plus the pre-sigmoid resized logits."""
  outputs = {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes),
             "pred_masks": torch.from_numpy(masks),
             "presence_logit_dec": torch.from_numpy(presence)}
  processor = Sam3Processor(_FakeModel(outputs), device="cpu", confidence_threshold=threshold)
  state = processor._forward_grounding({"original_height": hw[0], "original_width": hw[1],
                                        "backbone_out": None, "geometric_prompt": None})
  presence_prob = torch.sigmoid(outputs["presence_logit_dec"]).unsqueeze(1)
  probs = torch.sigmoid(outputs["pred_logits"]) * presence_prob
  keep = np.flatnonzero((probs.squeeze(-1) > threshold).numpy()[0])
  kept = outputs["pred_masks"][0, keep].unsqueeze(1)
  logits_hw = F.interpolate(kept, hw, mode="bilinear", align_corners=False)[:, 0].numpy()
  return {"keep": keep, "scores": state["scores"].numpy(), "boxes": state["boxes"].numpy(),
          "masks": state["masks"][:, 0].numpy(), "logits": logits_hw}


def _compare(ours, ref, hw, name):
  np.testing.assert_array_equal(ours["query_index"], ref["keep"], err_msg=f"{name}: kept set")
  k = len(ref["keep"])
  assert ours["scores"].shape == (k,) and ours["boxes_xyxy"].shape == (k, 4)
  assert ours["masks"].shape == (k, *hw) and ours["masks"].dtype == bool
  np.testing.assert_allclose(ours["scores"], ref["scores"], rtol=0, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(ours["boxes_xyxy"], ref["boxes"], rtol=0, atol=1e-5, err_msg=name)
  differ = ours["masks"] != ref["masks"]
  near_zero = np.abs(ref["logits"]) < 1e-5
  bad = int((differ & ~near_zero).sum())
  assert bad == 0, f"{name}: {bad} mask pixels differ away from logit 0"
  # Differences, if any, are confined to a handful of pixels at (numerically) zero logit.
  assert differ.sum() <= max(10, 1e-5 * differ.size), f"{name}: {int(differ.sum())} pixels differ"
  return differ


@pytest.mark.parametrize("q,m,hw", CASES)
def test_host_postprocess_matches_reference(q, m, hw):
  inputs = _outputs(q, m, seed=q + m)
  ref = _reference(*inputs, hw)
  assert 0 < len(ref["keep"]) < q  # the threshold really selects
  ours = post.postprocess(*(a[0] for a in inputs[:3]), inputs[3][0], hw)
  _compare(ours, ref, hw, "host")
  # The resized logits agree with F.interpolate.
  logits = resize_logits_np(inputs[2][0, ref["keep"]], hw)
  if hw[0] * hw[1] > SMALL_OUTPUT:
    np.testing.assert_array_equal(logits, ref["logits"])
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=2e-6)
  # The jittable route (the alignment losses') takes the same taps; XLA may contract to FMAs.
  jitted = jax.jit(resize_logits, static_argnums=1)(inputs[2][0, ref["keep"]], hw)
  np.testing.assert_allclose(np.asarray(jitted), ref["logits"], rtol=0, atol=1e-5)


def test_threshold_and_empty():
  inputs = _outputs(20, 16, seed=3, presence=-9.0)
  hw = (30, 20)
  ours = post.postprocess(*inputs, hw)
  assert ours["scores"].shape == (0,) and ours["boxes_xyxy"].shape == (0, 4)
  assert ours["masks"].shape == (0, 30, 20)
  inputs = _outputs(20, 16, seed=3)
  for threshold in (0.1, 0.7):
    ref = _reference(*inputs, hw, threshold=threshold)
    _compare(post.postprocess(*inputs, hw, threshold=threshold), ref, hw, f"t={threshold}")


def test_tiny_positive_logits_quirk():
  """The reference thresholds sigmoid(logit) > 0.5, which is False for logits in (0, ~1e-7]
  (float32 sigmoid rounds to 0.5); we threshold logit > 0. Only such pixels can differ."""
  logits, boxes, masks, pres = _outputs(4, 8, seed=0, presence=9.0)
  logits[:] = 9.0
  masks[0, 0] = 1e-8
  masks[0, 1] = 1e-4
  masks[0, 2] = -1e-8
  ref = _reference(logits, boxes, masks, pres, (12, 10))
  ours = post.postprocess(logits, boxes, masks, pres, (12, 10))
  assert ours["masks"][0].all() and not ref["masks"][0].any()  # the documented difference
  assert ours["masks"][1].all() and ref["masks"][1].all()
  assert not ours["masks"][2].any() and not ref["masks"][2].any()
  np.testing.assert_array_equal(ours["masks"][3], ref["masks"][3])


def test_shape_errors():
  logits, boxes, masks, pres = _outputs(4, 8, seed=0)
  with pytest.raises(ValueError):
    post.postprocess(logits[0], boxes[0, :3], masks[0], pres[0], (10, 10))
  with pytest.raises(ValueError):
    post.postprocess(np.repeat(logits, 2, 0), np.repeat(boxes, 2, 0), np.repeat(masks, 2, 0),
                     np.repeat(pres, 2, 0), (10, 10))
