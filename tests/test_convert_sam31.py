"""`python -m convert sam3` on SAM 3.1's layouts (tiny preset, random weights): the `.pt` of
Meta's release (sam3.1_multiplex.pt) and the fp16 safetensors repackage of it.

Both checkpoints are made from the reference model's weights by the renames between the releases
(tests/data/sam3.1_multiplex_keys.tsv): `convs.3` dropped, the tracker's `interactive_convs` and
`propagation_convs` neck branches and `tracker.model.*` added; the repackage further drops the
`freqs_cis` tables and `text_projection` and stores float16. The reference runs with SAM 3.1's
scoring (supervise_joint_box_scores, sam3_cpu.sam31_scoring); for the fp16 file it runs on the same
fp16-rounded weights.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
import sam3_cpu
import torch
from flax import nnx

from convert.__main__ import main as convert_main
from full_size_reference import released_layout
from sam3i_jax.predict import Predictor
from sam3i_jax.preprocess import preprocess
from sam3i_jax.pretrained import load_pretrained
from sam3i_jax.tokenizer import ClipTokenizer

TEXT = "a striped umbrella"
SAM31_IGNORED = {
    "video tracker (tracker.*)": 457,
    "the tracker's interactive neck (interactive_convs)": 18,
    "the tracker's propagation neck (propagation_convs)": 18,
}


@pytest.fixture(scope="module")
def tiny():
  config, torch_model, _ = parity.reference_model("tiny")
  return config, torch_model


def fp16_repackage(checkpoint: dict) -> dict:
  """sam3.1_multiplex.pt -> the fp16 safetensors repackage's tensors: no RoPE tables, no text
  projection, every tensor float16."""
  return {k: v.half() for k, v in checkpoint.items()
          if not k.endswith(".attn.freqs_cis") and not k.endswith(".encoder.text_projection")}


def save(checkpoint: dict, path) -> str:
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
  else:
    torch.save(checkpoint, str(path))
  return str(path)


def convert(path, out) -> int:
  return convert_main(["sam3", "--checkpoint", str(path), "--output", str(out), "--preset", "tiny"])


def reference_outputs(torch_model, image) -> dict:
  with sam3_cpu.sam31_scoring(torch_model):
    return sam3_cpu.run_text(torch_model, image, TEXT)


def run_ours(directory, image, tokens):
  model = load_pretrained(directory)
  out = nnx.jit(lambda m, i, t: m(i, t))(model, jnp.asarray(image.transpose(0, 2, 3, 1)),
                                         jnp.asarray(tokens))
  return model, jax.device_get(out)


def test_sam31_pt_converts_and_matches_the_reference_with_joint_scores(tmp_path, tiny, capsys):
  config, torch_model = tiny
  path = save(released_layout(torch_model, "sam3.1"), tmp_path / "sam3.1_multiplex.pt")
  assert convert(path, tmp_path / "out") == 0
  assert "a SAM 3.1 (sam3.1_multiplex.pt layout" in capsys.readouterr().out
  with open(tmp_path / "out" / "conversion.json") as f:
    report = json.load(f)
  assert report["variant"] == "sam3.1"
  assert report["ignored"] == {**SAM31_IGNORED, "unused text projection (text_projection)": 1,
                               "RoPE tables (freqs_cis; verified, then recomputed)": config.vit_depth}
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["variant"] == "sam3.1"

  image = sam3_cpu.random_image(torch_model, seed=11)
  ref = reference_outputs(torch_model, image)
  model, ours = run_ours(str(tmp_path / "out"), image, ref["input.text_tokens"])
  assert model.config == config.replace(variant="sam3.1")
  parity.assert_outputs_match(ours, ref, parity.TOL_SMALL)
  parity.assert_same_kept_sets(ours, ref, presence_in_logits=True)
  # The presence score is in the logits, once: SAM 3's logits differ.
  plain = sam3_cpu.run_text(torch_model, image, TEXT)["pred_logits"]
  assert parity.rel_l2(ours["pred_logits"], plain) > 0.1

  # predict scores such a model by its logits alone (threshold 0 keeps every query).
  photo = np.random.default_rng(3).integers(0, 256, (120, 90, 3), dtype=np.uint8)
  predictor = Predictor(model, ClipTokenizer(extra_dirs=[str(tmp_path / "out")]))
  result = predictor.predict(photo, TEXT, threshold=0.0)
  out = jax.device_get(nnx.jit(lambda m, p, t: m(p, t))(
      model, preprocess(photo, config.img_size)[None], predictor.tokenizer([TEXT])))
  np.testing.assert_allclose(result.scores, 1 / (1 + np.exp(-out["pred_logits"][0, :, 0])), rtol=1e-5)


def test_fp16_repackage_matches_the_reference_on_fp16_rounded_weights(tmp_path, tiny, capsys):
  config, torch_model = tiny
  repackage = fp16_repackage(released_layout(torch_model, "sam3.1"))
  assert all(v.dtype == torch.float16 for v in repackage.values())
  path = save(repackage, tmp_path / "sam3.1_multiplex_fp16.safetensors")
  assert convert(path, tmp_path / "out") == 0
  log = capsys.readouterr().out
  assert f"upcast {len(repackage)} float16 tensors to float32" in log
  assert "no RoPE tables (freqs_cis) in the checkpoint: the model computes them" in log
  with open(tmp_path / "out" / "conversion.json") as f:
    report = json.load(f)
  assert report["variant"] == "sam3.1" and report["source_dtypes"] == {"float16": len(repackage)}
  assert report["ignored"] == SAM31_IGNORED

  rounded = copy.deepcopy(torch_model)
  with torch.no_grad():
    for p in rounded.parameters():
      p.copy_(p.half().float())
  image = sam3_cpu.random_image(torch_model, seed=12)
  ref = reference_outputs(rounded, image)
  _, ours = run_ours(str(tmp_path / "out"), image, ref["input.text_tokens"])
  parity.assert_outputs_match(ours, ref, parity.TOL_SMALL)
  parity.assert_same_kept_sets(ours, ref, presence_in_logits=True)


@pytest.mark.parametrize("change, named", [
    ("unknown", "backbone.vision_backbone.propagation_convs.3.conv_1x1.weight (2,): no "
                "backbone.vision_backbone.convs.3.conv_1x1.weight"),
    ("missing", "missing: 1\n    transformer.decoder.bbox_embed.layers.0.bias"),
])
def test_an_unknown_or_missing_detector_tensor_is_named(tmp_path, tiny, capsys, change, named):
  _, torch_model = tiny
  checkpoint = released_layout(torch_model, "sam3.1")
  if change == "unknown":
    checkpoint["detector.backbone.vision_backbone.propagation_convs.3.conv_1x1.weight"] = torch.zeros(2)
  else:
    del checkpoint["detector.transformer.decoder.bbox_embed.layers.0.bias"]
  assert convert(save(checkpoint, tmp_path / "sam3.1_multiplex.pt"), tmp_path / "out") == 1
  assert named in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
