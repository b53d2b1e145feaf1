"""roi_align against torchvision.ops.roi_align (with sam3_cpu's kernel-bounds fix)."""

import parity  # noqa: F401  (first: applies the sam3_cpu torchvision workarounds)

import jax
import numpy as np
import pytest
import torch
import torchvision

from sam3i_jax.models.roi_align import default_max_samples
from sam3i_jax.models.roi_align import roi_align as _roi_align

H, W, C = 16, 12, 5

# Small graphs run once each: XLA's backend optimisation costs more than it saves.
roi_align = jax.jit(_roi_align, static_argnums=(2,), static_argnames=(
    "spatial_scale", "sampling_ratio", "aligned", "max_samples_per_bin"),
    compiler_options={"xla_backend_optimization_level": 0})


def _features(batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, H, W, C)).astype(np.float32)


def _boxes():
  """(2, 6, 4) xyxy boxes in feature pixels: inside, crossing borders, tiny, huge."""
  b0 = [[1.3, 2.2, 7.9, 10.1],      # inside
        [-3.05, -2.5, 4.2, 5.0],    # crosses the top-left border
        [8.5, 12.0, 14.0, 19.5],    # crosses the bottom-right border
        [5.1, 6.3, 5.6, 6.7],       # tiny (< 1 px)
        [-10.0, -12.0, 30.0, 40.0],  # huge: 40 x 52 px
        [0.0, 0.0, W, H]]           # exactly the map
  b1 = [[2.0, 3.0, 2.0, 3.0],       # empty
        [10.9, 14.9, 11.4, 15.8],   # at the last row/column
        [-0.9, -0.95, 0.3, 0.2],    # sample points in [-1, 0]
        [-5.0, 3.0, -1.5, 9.0],     # entirely left of the map
        [0.5, 0.5, 11.5, 15.5],
        [3.3, 1.1, 9.9, 13.7]]
  return np.array([b0, b1], np.float32)


def _torch_roi_align(feat, boxes, out, scale=1.0, sampling_ratio=-1, aligned=False):
  t = torch.from_numpy(feat).permute(0, 3, 1, 2)
  rois = [torch.from_numpy(b) for b in boxes]
  r = torchvision.ops.roi_align(t, rois, out, spatial_scale=scale, sampling_ratio=sampling_ratio,
                                aligned=aligned)
  return r.permute(0, 2, 3, 1).numpy().reshape(boxes.shape[0], boxes.shape[1], out, out, C)


def _kernel_roi_align(feat, boxes, out, scale=1.0, sampling_ratio=-1, aligned=False):
  """A float64 loop port of torchvision's C++ kernel (csrc/ops/cpu/roi_align_kernel.cpp).

  torchvision's pure-PyTorch fallback samples at most H (W) points per bin and axis but divides
  by the full count, so it is wrong for boxes larger than out * H; this port is the oracle there.
  """
  f = feat.astype(np.float64)
  res = np.zeros(boxes.shape[:2] + (out, out, feat.shape[-1]))
  off = 0.5 if aligned else 0.0
  for b in range(boxes.shape[0]):
    for n in range(boxes.shape[1]):
      x1, y1, x2, y2 = boxes[b, n].astype(np.float64) * scale - off
      rw, rh = x2 - x1, y2 - y1
      if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
      gh = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rh / out))
      gw = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rw / out))
      count = max(gh * gw, 1)
      for ph in range(out):
        for pw in range(out):
          acc = np.zeros(feat.shape[-1])
          for iy in range(gh):
            y = y1 + ph * rh / out + (iy + 0.5) * rh / out / gh
            for ix in range(gw):
              x = x1 + pw * rw / out + (ix + 0.5) * rw / out / gw
              if y < -1.0 or y > H or x < -1.0 or x > W:
                continue
              yy, xx = max(y, 0.0), max(x, 0.0)
              yl, xl = int(yy), int(xx)
              if yl >= H - 1:
                yl = yh = H - 1
                yy = float(yl)
              else:
                yh = yl + 1
              if xl >= W - 1:
                xl = xh = W - 1
                xx = float(xl)
              else:
                xh = xl + 1
              ly, lx = yy - yl, xx - xl
              acc += ((1 - ly) * (1 - lx) * f[b, yl, xl] + (1 - ly) * lx * f[b, yl, xh]
                      + ly * (1 - lx) * f[b, yh, xl] + ly * lx * f[b, yh, xh])
          res[b, n, ph, pw] = acc / count
  return res


@pytest.mark.parametrize("out", [1, 3, 7])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(out, aligned):
  feat, boxes = _features(), _boxes()
  # A bound large enough for the huge box (52 px / out), so every box is exact.
  ours = np.asarray(roi_align(feat, boxes, out, aligned=aligned, max_samples_per_bin=-(-52 // out)))
  kernel = _kernel_roi_align(feat, boxes, out, aligned=aligned)
  parity.assert_close(ours, kernel, 1e-5, f"roi_align out={out} aligned={aligned} vs kernel port")
  np.testing.assert_allclose(ours, kernel, rtol=1e-5, atol=1e-5)
  ref = _torch_roi_align(feat, boxes, out, aligned=aligned)
  # Where torchvision's fallback is exact (at most H x W samples per bin), it agrees too.
  exact = np.ones(boxes.shape[:2], bool)
  exact[0, 4] = out >= 4  # the huge box: 40 x 52 px needs ceil(52 / out) <= 16, ceil(40 / out) <= 12
  parity.assert_close(ours[exact], ref[exact], 1e-5, f"roi_align out={out} aligned={aligned}")
  np.testing.assert_allclose(ours[exact], ref[exact], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
def test_fixed_sampling_ratio_and_scale(sampling_ratio):
  feat, boxes = _features(), _boxes() * 2.0
  ref = _torch_roi_align(feat, boxes, 7, scale=0.5, sampling_ratio=sampling_ratio)
  ours = roi_align(feat, boxes, 7, spatial_scale=0.5, sampling_ratio=sampling_ratio)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_default_bound_exact_for_boxes_up_to_map_size():
  """Without an explicit bound every box no larger than the map (+1 px) is exact."""
  feat = _features()
  rng = np.random.default_rng(1)
  size = rng.uniform(0.2, max(H, W) + 1, (2, 20, 2))
  corner = rng.uniform(-8, 18, (2, 20, 2))
  boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
  out = 3
  assert default_max_samples(H, W, out) == 6  # ceil(17 / 3)
  ref = _torch_roi_align(feat, boxes, out)
  np.testing.assert_allclose(roi_align(feat, boxes, out), ref, rtol=1e-5, atol=1e-5)


def test_huge_box_is_clipped_to_the_bound():
  """A box beyond the bound on both axes is sampled on bound x bound points per bin."""
  feat, out = _features(), 7
  bound = default_max_samples(H, W, out)  # 3
  boxes = np.array([[[-20.0, -30.0, 40.0, 50.0]]] * 2, np.float32)  # 60 x 80 px
  ref_clipped = _torch_roi_align(feat, boxes, out, sampling_ratio=bound)
  np.testing.assert_allclose(roi_align(feat, boxes, out), ref_clipped, rtol=1e-5, atol=1e-5)
  exact = _torch_roi_align(feat, boxes, out)
  np.testing.assert_allclose(roi_align(feat, boxes, out, max_samples_per_bin=12), exact,
                             rtol=1e-5, atol=1e-5)
