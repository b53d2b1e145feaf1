"""`python -m convert export`: converted models back to Meta's sam3.pt (SAM 3 and SAM 3.1, and the
fp16 safetensors repackage) and the SAM3-I checkpoint layout, tiny preset, random weights.

Round trips compare the exported file with the checkpoint the model was converted from, tensor by
tensor and bit for bit (the strongest form of import -> export -> import); Meta's model loads the
export of a model whose weights moved after conversion (as training moves them) with no missing
and no unexpected key, and computes our outputs.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import sam3_cpu
import torch
from flax import nnx

from convert.__main__ import main as convert_main
from full_size_reference import released_layout
from sam3i_jax.pretrained import load_pretrained, save_pretrained
from sam3i_jax.tokenizer import find_vocab
from test_convert_sam31 import fp16_repackage, save
from test_convert_sam3i import sam3i_state_dict

TEXT = "a striped umbrella"
TEXT_PROJECTION = "backbone.language_backbone.encoder.text_projection"


@pytest.fixture(scope="module")
def tiny():
  config, torch_model, _ = parity.reference_model("tiny")
  return config, torch_model


def convert(kind: str, path, out, *extra) -> str:
  assert convert_main([kind, "--checkpoint", str(path), "--output", str(out), "--preset", "tiny",
                       *extra]) == 0
  return str(out)


def export(model_dir, fmt: str, out, *extra) -> int:
  return convert_main(["export", "--model", str(model_dir), "--format", fmt, "--output", str(out),
                       *extra])


def read(path) -> dict:
  if str(path).endswith(".safetensors"):
    from safetensors.torch import load_file
    return load_file(str(path))
  checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
  assert list(checkpoint) == ["model"]
  return checkpoint["model"]


def assert_identical(exported: dict, original: dict, skip=()) -> None:
  """Same keys (but `skip`), and every tensor equal bit for bit, in the same dtype."""
  assert sorted(k for k in exported if k not in skip) == sorted(k for k in original if k not in skip)
  different = [k for k in original if k not in skip and not (
      exported[k].dtype == original[k].dtype and torch.equal(exported[k], original[k]))]
  assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def flat_params(directory) -> dict:
  model = load_pretrained(str(directory))
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
  first, second = flat_params(a), flat_params(b)
  assert first.keys() == second.keys()
  for k in first:
    np.testing.assert_array_equal(first[k], second[k], err_msg=str(k))


@pytest.mark.parametrize("variant", ["sam3", "sam3.1"])
def test_sam3_pt_round_trip_is_bit_identical(tmp_path, tiny, variant, capsys):
  _, torch_model = tiny
  original = released_layout(torch_model, variant)
  path = save(original, tmp_path / "original.pt")
  converted = convert("sam3", path, tmp_path / "converted")
  assert export(converted, "sam3", tmp_path / "exported.pt", "--tracker-from", path) == 0
  log = capsys.readouterr().out
  assert "RoPE tables (freqs_cis), computed as Meta's ViT does" in log
  assert f"video tracker and the tracker's neck copies, from {path}" in log
  # Everything: the parameters, Meta's RoPE tables, the tracker, its neck copies, text_projection.
  assert_identical(read(tmp_path / "exported.pt"), original)
  assert_same_params(converted, convert("sam3", tmp_path / "exported.pt", tmp_path / "again"))


def test_sam31_fp16_safetensors_round_trip(tmp_path, tiny, capsys):
  _, torch_model = tiny
  repackage = fp16_repackage(released_layout(torch_model, "sam3.1"))
  path = save(repackage, tmp_path / "sam3.1_multiplex_fp16.safetensors")
  converted = convert("sam3", path, tmp_path / "converted")
  out = tmp_path / "exported.safetensors"
  assert export(converted, "sam3", out, "--dtype", "float16", "--safetensors", "--tracker-from",
                path) == 0
  assert "left out: 4 tensors: RoPE tables (freqs_cis): safetensors holds no complex" in (
      capsys.readouterr().out)
  exported = read(out)
  # The repackage has no text_projection; the export writes zeros there (Meta's loader expects it).
  assert torch.equal(exported.pop("detector." + TEXT_PROJECTION),
                     torch.zeros(64, 512, dtype=torch.float16))
  assert_identical(exported, repackage)
  assert_same_params(converted, convert("sam3", out, tmp_path / "again"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
  """A converted tiny SAM 3 whose every parameter then moved (as after fine-tuning)."""
  _, torch_model = tiny
  directory = tmp_path_factory.mktemp("trained")
  path = save(released_layout(torch_model), directory / "sam3.pt")
  model = load_pretrained(convert("sam3", path, directory / "converted"))
  rng = np.random.default_rng(5)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda p: p + jnp.asarray(0.01 * rng.standard_normal(p.shape), p.dtype), params))
  save_pretrained(model, model.config, str(directory / "trained"), vocab_path=find_vocab())
  return str(directory / "trained")


def test_meta_loads_the_export_with_no_missing_key_and_gives_our_outputs(tmp_path, trained, tiny):
  config, _ = tiny
  assert export(trained, "sam3", tmp_path / "sam3.pt") == 0
  state = {k.removeprefix("detector."): v for k, v in read(tmp_path / "sam3.pt").items()}
  meta = sam3_cpu.build_tiny(seed=7, **parity.reference_sizes(config))  # other random weights
  result = meta.load_state_dict(state, strict=False)
  assert result.missing_keys == [] and result.unexpected_keys == []

  image = sam3_cpu.random_image(meta, seed=13)
  ref = sam3_cpu.run_text(meta, image, TEXT)
  model = load_pretrained(trained)
  ours = jax.device_get(nnx.jit(lambda m, i, t: m(i, t))(
      model, jnp.asarray(image.transpose(0, 2, 3, 1)), jnp.asarray(ref["input.text_tokens"])))
  parity.assert_outputs_match(ours, ref, parity.TOL_SMALL)
  # Not a coincidence of equal weights: the reference model before the move differs.
  _, original = tiny
  before = sam3_cpu.run_text(original, image, TEXT)
  assert parity.rel_l2(ours["pred_boxes"], before["pred_boxes"]) > 10 * parity.TOL_SMALL


def test_bfloat16_export_is_the_rounded_model(tmp_path, trained):
  assert export(trained, "sam3", tmp_path / "bf16.pt", "--dtype", "bfloat16") == 0
  assert export(trained, "sam3", tmp_path / "fp32.pt") == 0
  low, full = read(tmp_path / "bf16.pt"), read(tmp_path / "fp32.pt")
  assert low.keys() == full.keys()
  for key, tensor in full.items():
    expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    assert low[key].dtype == expected.dtype and torch.equal(low[key], expected), key


def test_sam3i_round_trip_is_bit_identical(tmp_path, capsys):
  original = sam3i_state_dict()
  path = save({"model": original}, tmp_path / "checkpoint.pt")
  converted = convert("sam3i", path, tmp_path / "converted")
  assert export(converted, "sam3i", tmp_path / "exported.pt") == 0
  log = capsys.readouterr().out
  assert "dead duplicate text encoder (backbone.text.*): a copy of the live one" in log
  exported = read(tmp_path / "exported.pt")
  # The unused text projection is not kept by the converter: zeros, in both text encoders.
  for key in (TEXT_PROJECTION, TEXT_PROJECTION.replace("language_backbone", "text")):
    assert torch.equal(exported[key], torch.zeros_like(original[key])), key
  assert_identical(exported, original, skip={TEXT_PROJECTION,
                                             TEXT_PROJECTION.replace("language_backbone", "text")})
  assert_same_params(converted, convert("sam3i", tmp_path / "exported.pt", tmp_path / "again"))


def test_adapters_are_refused_by_name_or_dropped_when_asked(tmp_path, capsys):
  path = save({"model": sam3i_state_dict()}, tmp_path / "checkpoint.pt")
  converted = convert("sam3i", path, tmp_path / "converted")
  assert export(converted, "sam3", tmp_path / "refused.pt") == 1
  err = capsys.readouterr().err
  assert "the sam3 layout has no place for SAM3-I's parameters: simple adapters" in err
  assert "--drop-adapters" in err and not os.path.exists(tmp_path / "refused.pt")

  assert export(converted, "sam3", tmp_path / "sam3.pt", "--drop-adapters") == 0
  log = capsys.readouterr().out
  for group in ("simple adapters", "complex adapters", "simple mask predictor",
                "complex mask predictor", "projection head"):
    assert f"SAM3-I's {group} (--drop-adapters)" in log, group
  # What is left is SAM 3 itself: it converts back to the SAM3-I model's SAM 3 parameters.
  sam3 = flat_params(convert("sam3", tmp_path / "sam3.pt", tmp_path / "back"))
  sam3i = flat_params(converted)
  assert sam3.keys() < sam3i.keys()
  for key, value in sam3.items():
    np.testing.assert_array_equal(value, sam3i[key], err_msg=str(key))


def test_wrong_requests_are_refused(tmp_path, trained, capsys):
  assert export(trained, "sam3i", tmp_path / "a.pt") == 1
  assert "has no SAM3-I adapters (a SAM 3 model): export it with --format sam3" in capsys.readouterr().err
  assert export(trained, "sam3", tmp_path / "b.pt", "--tracker-from", str(tmp_path / "none.pt")) == 1
  assert "none.pt does not exist" in capsys.readouterr().err
  os.makedirs(tmp_path / "taken")
  assert export(trained, "sam3", tmp_path / "taken") == 1
  assert "exists; choose a new path" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export(trained, "onnx", tmp_path / "c")


def test_meta_processor_on_the_demo_model_export_detects_what_predict_detects(tmp_path):
  """The demo's trained tiny model (the fine-tuning demo's start, assets/demo_sam3_tiny) exported
  to sam3.pt, loaded into Meta's model and run through Meta's Sam3Processor on a demo image, finds
  the detections `python -m sam3i_jax.predict` writes for the same image and text."""
  import json

  from PIL import Image
  from pycocotools import mask as mask_utils
  from sam3.model.sam3_image_processor import Sam3Processor

  from configs import hmpl
  from input_pipeline import demo_data
  from sam3i_jax.predict import main as predict_main
  from sam3i_jax.pretrained import read_config

  root = demo_data.ensure_demo_data(tmp_path / "demo", num_train_images=1, num_val_images=1)
  with open(root / demo_data.COCO_FOLDER / "instances_val.json") as f:
    coco = json.load(f)
  image = coco["images"][0]
  category = next(c for c in coco["categories"]
                  if c["id"] == next(a for a in coco["annotations"]
                                     if a["image_id"] == image["id"])["category_id"])
  folder = tmp_path / "one"
  os.makedirs(folder)
  path = root / demo_data.IMAGE_FOLDER / image["file_name"]
  os.symlink(path, folder / os.path.basename(image["file_name"]))
  assert predict_main(["--model", hmpl.DEMO_SAM3_DIR, "--images", str(folder), "--text",
                       category["name"], "--output", str(tmp_path / "ours.json")]) == 0
  with open(tmp_path / "ours.json") as f:
    ours = sorted(json.load(f), key=lambda r: -r["score"])
  assert ours, "the demo model finds nothing: the comparison would be empty"

  assert export(hmpl.DEMO_SAM3_DIR, "sam3", tmp_path / "demo.pt", "--drop-adapters") == 0
  config = read_config(hmpl.DEMO_SAM3_DIR)
  meta = sam3_cpu.build_tiny(**parity.reference_sizes(config)).eval()
  result = meta.load_state_dict(
      {k.removeprefix("detector."): v for k, v in read(tmp_path / "demo.pt").items()}, strict=False)
  assert result.missing_keys == [] and result.unexpected_keys == []
  processor = Sam3Processor(meta, resolution=config.img_size, device="cpu", confidence_threshold=0.5)
  state = processor.set_text_prompt(category["name"],
                                    processor.set_image(Image.open(path).convert("RGB")))
  order = torch.argsort(state["scores"], descending=True)
  scores, boxes = state["scores"][order].numpy(), state["boxes"][order].numpy()
  masks = state["masks"][order, 0].numpy()
  assert len(scores) == len(ours)
  np.testing.assert_allclose([r["score"] for r in ours], scores, rtol=1e-4)
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
  np.testing.assert_allclose([r["bbox"] for r in ours], xywh, atol=1e-2)
  for mine, theirs in zip(ours, masks):
    decoded = mask_utils.decode(mine["segmentation"]).astype(bool)
    assert (decoded != theirs).mean() < 1e-3, (decoded != theirs).sum()
