"""Image transform against Sam3Processor's torchvision v2 pipeline, and image loading."""

import numpy as np
import parity  # noqa: F401  (must precede torch/sam3)
import pytest
import torch
from PIL import Image
from sam3.model.sam3_image_processor import Sam3Processor
from torchvision.transforms import v2

from sam3i_jax import preprocess as pp

# (height, width, size): downscale, upscale, non-square both ways, mixed, tiny, no-op.
CASES = [(480, 640, 224), (100, 150, 224), (333, 700, 336), (1200, 900, 1008),
         (37, 53, 64), (224, 224, 224), (500, 300, 224), (1, 5, 7), (97, 1031, 112)]


def _reference(image, size: int) -> np.ndarray:
  """Sam3Processor.set_image's transform on the CPU, as (size, size, 3)."""
  processor = Sam3Processor(None, resolution=size, device="cpu")
  out = processor.transform(v2.functional.to_image(image))
  return out.permute(1, 2, 0).numpy()


def _image(h: int, w: int, seed: int) -> np.ndarray:
  """Half noise, half smooth gradients (so both rounding regimes are exercised)."""
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  smooth = (255 * np.stack([yy, xx, (yy + xx) / 2], -1)).astype(np.uint8)
  return np.where(rng.random((h, w, 1)) < 0.5, noise, smooth)


@pytest.mark.parametrize("h,w,size", CASES)
def test_matches_sam3_processor_bit_exact(h, w, size):
  image = _image(h, w, seed=h * 7 + w)
  ours = pp.preprocess(image, size)
  ref = _reference(image, size)
  assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
  np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("h,w,size", CASES)
def test_float_mode_matches_cuda_style_resize(h, w, size):
  """mode="float" is torchvision's non-native path: float32 interpolate, round, uint8."""
  image = _image(h, w, seed=h + w)
  x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
  if (h, w) != (size, size):
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True).round()
  ref = ((x.to(torch.uint8).float() / 255 - 0.5) / 0.5)[0].permute(1, 2, 0).numpy()
  ours = pp.preprocess(image, size, mode="float")
  err = np.abs(ours - ref)
  # float32 (torch) vs float64 (ours) weights: pixels within ~1e-4 of a .5 tie may round apart.
  assert err.max() <= 2 / 255 + 1e-6
  assert (err > 1e-6).mean() < 5e-3
  assert err.mean() < 2e-5


def test_uint8_and_float_modes_differ_by_one_level_at_most():
  image = _image(640, 480, seed=3)
  a = pp.resize_uint8(image, 224, 224, "uint8").astype(int)
  b = pp.resize_uint8(image, 224, 224, "float").astype(int)
  assert np.abs(a - b).max() == 1  # the two torch code paths genuinely differ ...
  assert (a != b).mean() < 0.5  # ... on a minority of pixels


def test_float_input_like_todtype():
  rng = np.random.default_rng(1)
  image = rng.random((50, 70, 3), dtype=np.float32)
  ref = _reference(torch.from_numpy(image).permute(2, 0, 1), 32)
  np.testing.assert_array_equal(pp.preprocess(image, 32), ref)


def test_bad_inputs():
  with pytest.raises(ValueError):
    pp.preprocess(np.zeros((10, 10), np.uint8), 8)
  with pytest.raises(ValueError):
    pp.preprocess(np.zeros((10, 10, 4), np.uint8), 8)
  with pytest.raises(ValueError):
    pp.preprocess(np.zeros((10, 10, 3), np.uint8), 8, mode="bicubic")


def test_load_image_matches_reference_pil_path(tmp_path):
  """PNG (palette, RGBA) and JPEG with an EXIF rotation: pixels as sam3 sees them."""
  rgb = _image(40, 60, seed=5)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  jpeg = tmp_path / "rotated.jpg"
  Image.fromarray(rgb).save(jpeg, exif=exif, quality=95)
  rgba = tmp_path / "rgba.png"
  Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA").save(rgba)
  pal = tmp_path / "palette.png"
  Image.fromarray(rgb).convert("P").save(pal)
  for path in (jpeg, rgba, pal):
    ours = pp.load_image(path)
    want = np.asarray(Image.open(path).convert("RGB"))
    assert ours.dtype == np.uint8 and ours.shape == (40, 60, 3)
    np.testing.assert_array_equal(ours, want)
  # The processor sees the stored (unrotated) JPEG pixels; the end-to-end transform agrees.
  with Image.open(jpeg) as image:
    ref = _reference(image.convert("RGB"), 56)
  np.testing.assert_array_equal(pp.preprocess(pp.load_image(jpeg), 56), ref)
  assert pp.load_image(jpeg, exif_transpose=True).shape == (60, 40, 3)
