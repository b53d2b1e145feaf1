"""`python -m convert sam3` on random-weight checkpoints in the released key layout (tiny preset)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import parity
import pytest
import sam3_cpu
import torch
from flax import nnx

from convert.__main__ import main as convert_main
from full_size_reference import released_layout
from sam3i_jax.pretrained import load_pretrained


@pytest.fixture(scope="module")
def tiny():
  config, torch_model, _ = parity.reference_model("tiny")
  return config, torch_model, released_layout(torch_model)


def convert(tmp_path, checkpoint_obj, name="sam3.pt", *extra):
  os.makedirs(tmp_path, exist_ok=True)
  path = os.path.join(tmp_path, name)
  if name.endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in checkpoint_obj.items() if not v.is_complex()}, path)
  else:
    torch.save(checkpoint_obj, path)
  out = os.path.join(tmp_path, "converted")
  return convert_main(["sam3", "--checkpoint", path, "--output", out, "--preset", "tiny", *extra]), out


def test_released_layout_converts_and_matches_reference(tmp_path, tiny):
  config, torch_model, checkpoint = tiny
  rc, out = convert(tmp_path, checkpoint)
  assert rc == 0
  report = json.load(open(os.path.join(out, "conversion.json")))
  assert report["loaded"] == len([k for k in torch_model.state_dict() if not k.endswith("freqs_cis")]) - 1
  assert report["ignored"] == {
      "video tracker (tracker.*)": 309,
      "SAM 2 neck copy for the interactive tracker (sam2_convs)": 22,
      "RoPE tables (freqs_cis; verified, then recomputed)": config.vit_depth,
      "unused text projection (text_projection)": 1}
  model = load_pretrained(out)
  assert model.config == config
  image = sam3_cpu.random_image(torch_model, seed=11)
  ref = sam3_cpu.run_text(torch_model, image, "a striped umbrella")
  ours = nnx.jit(lambda m, i, t: m(i, t))(model, jnp.asarray(image.transpose(0, 2, 3, 1)),
                                          jnp.asarray(ref["input.text_tokens"]))
  for name in ("pred_logits", "pred_boxes", "pred_masks", "semantic_seg"):
    parity.assert_close(ours[name], ref[name], parity.TOL_SMALL, name)
  assert os.path.isfile(os.path.join(out, "bpe_simple_vocab_16e6.txt.gz"))


def flat_params(directory):
  model = load_pretrained(directory)
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_wrapped_dict_and_safetensors_give_the_same_parameters(tmp_path, tiny):
  _, _, checkpoint = tiny
  rc, plain = convert(tmp_path / "a", checkpoint)
  assert rc == 0
  rc, wrapped = convert(tmp_path / "b", {"model": checkpoint})
  assert rc == 0
  rc, safetensors = convert(tmp_path / "c", checkpoint, "sam3.safetensors")
  assert rc == 0
  reference = flat_params(plain)
  for other in (flat_params(wrapped), flat_params(safetensors)):
    assert other.keys() == reference.keys()
    for k in reference:
      np.testing.assert_array_equal(other[k], reference[k], err_msg=str(k))


def test_missing_size_tensor_is_named(tmp_path, tiny, capsys):
  _, _, checkpoint = tiny
  broken = dict(checkpoint)
  del broken["detector.transformer.decoder.query_embed.weight"]
  rc, _ = convert(tmp_path, broken)
  err = capsys.readouterr().err
  assert rc == 1
  assert "required tensor transformer.decoder.query_embed.weight is missing" in err


def test_missing_unexpected_and_misshaped_are_all_listed(tmp_path, tiny, capsys):
  _, _, checkpoint = tiny
  broken = dict(checkpoint)
  del broken["detector.geometry_encoder.cls_embed.weight"]
  broken["detector.segmentation_head.extra.weight"] = torch.zeros(3)
  broken["detector.dot_prod_scoring.hs_proj.bias"] = torch.zeros(5)
  rc, out = convert(tmp_path, broken)
  err = capsys.readouterr().err
  assert rc == 1 and not os.path.exists(out)
  assert "missing: 1" in err and "geometry_encoder.cls_embed.weight" in err
  assert "unexpected: 1" in err and "segmentation_head.extra.weight" in err
  assert "shape mismatch: 1" in err and "dot_prod_scoring.hs_proj.bias: (5,)" in err


def test_sizes_that_disagree_with_the_preset_are_named(tmp_path, tiny, capsys):
  _, _, checkpoint = tiny
  path = os.path.join(tmp_path, "sam3.pt")
  torch.save(checkpoint, path)
  rc = convert_main(["sam3", "--checkpoint", path, "--output", str(tmp_path / "o"), "--preset", "full"])
  err = capsys.readouterr().err
  assert rc == 1 and "vit_dim: checkpoint says 128, config says 1024" in err


def test_model_config_json_overrides_the_preset(tmp_path, tiny):
  _, _, checkpoint = tiny
  path = os.path.join(tmp_path, "sam3.pt")
  torch.save(checkpoint, path)
  override = tmp_path / "sizes.json"
  override.write_text(json.dumps({"dtype": "bfloat16"}))
  rc = convert_main(["sam3", "--checkpoint", path, "--output", str(tmp_path / "o"), "--preset", "tiny",
                     "--model-config", str(override)])
  assert rc == 0
  assert load_pretrained(str(tmp_path / "o")).config.dtype == "bfloat16"


def test_rope_tables_that_disagree_are_rejected(tmp_path, tiny, capsys):
  _, _, checkpoint = tiny
  broken = dict(checkpoint)
  key = "detector.backbone.vision_backbone.trunk.blocks.1.attn.freqs_cis"
  broken[key] = broken[key] * torch.exp(1j * torch.tensor(0.01))
  rc, _ = convert(tmp_path, broken)
  err = capsys.readouterr().err
  assert rc == 1 and "blocks.1.attn.freqs_cis" in err and "global block" in err


def test_safetensors_are_read_tensor_by_tensor_as_safetensors_reads_them(tmp_path):
  from safetensors.torch import load_file, save_file

  from convert.checkpoint_io import read_checkpoint
  gen = torch.Generator().manual_seed(0)
  tensors = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen).half(),
             "c": torch.randn(2, 2, 2, generator=gen).bfloat16(), "d": torch.arange(7),
             "e": torch.tensor([True, False]), "f": torch.zeros(0, 3)}
  path = str(tmp_path / "t.safetensors")
  save_file(tensors, path, metadata={"format": "pt"})
  store, want = read_checkpoint(path), load_file(path)
  assert sorted(store) == sorted(want)
  assert store.dtypes() == {"float32": 2, "float16": 1, "bfloat16": 1, "int64": 1, "bool": 1}
  for key, tensor in want.items():
    assert store.shape(key) == tuple(tensor.shape)
    got = store.raw(key)
    assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-8])
  truncated = read_checkpoint(path)
  with pytest.raises(ValueError, match="t.safetensors: truncated"):
    for key in want:  # the last tensor in the file lost its end
      truncated.raw(key)
