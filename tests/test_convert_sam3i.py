"""`python -m convert sam3i` (SAM3-I checkpoints) and `python -m convert sam3 --adapters`, tiny preset.

The SAM3-I checkpoint is written here in the released layout: Meta's SAM 3 state dict (random
weights) plus SAM3-I's additions from the PyTorch restatement of the reference modules in
test_adapters.py, the dead duplicate text encoder `backbone.text.*` and the shared projection head
under its three names, inside a trainer-style {"model": ...} dict.
"""

import json
import os

import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import torch
from torch import nn

import jax
import jax.numpy as jnp
from flax import nnx

from convert.__main__ import main as convert_main
from convert.torch_layout import param_table
from full_size_reference import released_layout
from sam3i_jax.models.levels import Level
from sam3i_jax.models.sam3 import TextFeatures
from sam3i_jax.pretrained import load_pretrained
from test_adapters import TorchBottleneckAdapter, TorchTextAdapter, torch_adapter_triple

HEAD_NAMES = ("simple_query_proj", "complex_query_proj", "concept_proj")


def sam3i_state_dict(stage: int = 3) -> dict:
  """A SAM3-I model's state dict (torch tensors) for the tiny preset, as the trainer saves it."""
  config, model, _ = parity.reference_model("tiny")
  sd = dict(model.state_dict())
  text, d = "backbone.language_backbone.encoder.transformer.resblocks.", config.d_model
  for i in range(config.text_layers):
    triple = torch_adapter_triple(lambda _: TorchTextAdapter(
        config.text_width, config.text_adapter_heads, config.text_adapter_bottleneck), seed=i)
    sd.update({f"{text}{i}.{k}": v for k, v in triple.state_dict().items()})
  for part, layers in (("encoder", config.num_enc_layers), ("decoder", config.num_dec_layers)):
    for i in range(layers):
      skip = part == "encoder"  # the fusion encoder's adapter2 has skip_connect (no parameter)
      triple = torch_adapter_triple(
          lambda name: TorchBottleneckAdapter(d, config.adapter_bottleneck, skip and name == "adapter2"),
          seed=100 + i)
      sd.update({f"transformer.{part}.layers.{i}.{k}": v for k, v in triple.state_dict().items()})
  predictor = "segmentation_head.mask_predictor."
  for copy, seed in (("mask_predictor_adapter1", 1), ("mask_predictor_adapter2", 2)):
    gen = torch.Generator().manual_seed(seed)
    sd.update({k.replace("mask_predictor.", copy + "."): v + 0.01 * torch.randn(v.shape, generator=gen)
               for k, v in list(sd.items()) if k.startswith(predictor)})
  if stage == 3:  # one module registered under three names (share_mlp_params)
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True), nn.Linear(d, d))
    for name in HEAD_NAMES:
      sd.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
  sd.update({"backbone.text." + k[len("backbone.language_backbone."):]: v.clone()
             for k, v in list(sd.items()) if k.startswith("backbone.language_backbone.")})
  return sd


@pytest.fixture(scope="module")
def checkpoint():
  return sam3i_state_dict()


def convert(tmp_path, obj, kind="sam3i", *extra):
  os.makedirs(tmp_path, exist_ok=True)
  path = os.path.join(tmp_path, "checkpoint.pt")
  torch.save(obj, path)
  out = os.path.join(tmp_path, "converted")
  return convert_main([kind, "--checkpoint", path, "--output", out, "--preset", "tiny", *extra]), out


def test_sam3i_checkpoint_round_trip(tmp_path, checkpoint):
  """Every tensor lands, transformed by the layout rules, in exactly one Flax parameter."""
  trainer_dict = {"model": checkpoint, "epoch": 4, "inst_stage": "3", "adapter_config": {"adapter_dim": 16}}
  rc, out = convert(tmp_path, trainer_dict)
  assert rc == 0
  report = json.load(open(os.path.join(out, "conversion.json")))
  config, _, _ = parity.reference_model("tiny")
  dead = sum(k.startswith("backbone.text.") for k in checkpoint)
  assert report["ignored"] == {
      "RoPE tables (freqs_cis; verified, then recomputed)": config.vit_depth,
      "unused text projection (text_projection)": 1,
      "dead duplicate text encoder (backbone.text.*)": dead,
      "shared projection head under its other names (complex_query_proj, concept_proj; identical)": 12}
  assert report["initialised"] == {}
  assert report["loaded"] == len(checkpoint) - sum(report["ignored"].values())
  model = load_pretrained(out)
  assert model.config == config.replace(adapters=True)
  table = param_table(model)
  assert len(table) == report["loaded"]
  for key, entry in table.items():
    value = entry.param[...] if entry.layer is None else entry.param[...][entry.layer]
    np.testing.assert_array_equal(value, entry.transform(checkpoint[key].numpy()), err_msg=key)

  # The projection head computes the reference's Sequential on the mean of all token features.
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((3, config.context_length, config.d_model)).astype(np.float32)
  head = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.LayerNorm(config.d_model), nn.ReLU(),
                       nn.Linear(config.d_model, config.d_model))
  head.load_state_dict({k[len("concept_proj."):]: v for k, v in checkpoint.items()
                        if k.startswith("concept_proj.")})
  with torch.no_grad():
    ref = head(torch.from_numpy(tokens).mean(1))
  padded = jnp.asarray(np.arange(config.context_length)[None].repeat(3, 0) > 5)  # padding counts too
  ours = model.instruction_embedding(TextFeatures(jnp.asarray(tokens), padded))
  parity.assert_close(ours, parity.to_numpy(ref), parity.TOL_SMALL, "instruction embedding")


def test_stage1_checkpoint_gets_a_fresh_projection_head(tmp_path):
  rc, out = convert(tmp_path, {"model": sam3i_state_dict(stage=1)})
  assert rc == 0
  report = json.load(open(os.path.join(out, "conversion.json")))
  assert report["initialised"] == {"projection head (random)": 6}
  head = nnx.state(load_pretrained(out), nnx.Param)["simple_query_proj"]
  assert np.abs(np.asarray(head[0]["kernel"][...])).max() > 0


def test_separate_projection_heads_are_rejected(tmp_path, checkpoint, capsys):
  broken = dict(checkpoint)
  broken["concept_proj.3.bias"] = broken["concept_proj.3.bias"] + 1.0
  rc, _ = convert(tmp_path, {"model": broken})
  assert rc == 1 and "share_mlp_params" in capsys.readouterr().err


def test_partly_present_groups_are_rejected(tmp_path, checkpoint, capsys):
  broken = {k: v for k, v in checkpoint.items() if not k.startswith("transformer.decoder.layers.1.adapter2.")}
  rc, _ = convert(tmp_path / "a", {"model": broken})
  err = capsys.readouterr().err
  assert rc == 1 and "missing: 6" in err and "transformer.decoder.layers.1.adapter2.up_proj.weight" in err
  broken = {k: v for k, v in checkpoint.items() if not k.endswith("_proj.3.bias")}
  rc, _ = convert(tmp_path / "b", {"model": broken})
  assert rc == 1 and "group only partly in the checkpoint: projection head" in capsys.readouterr().err


def test_the_wrong_subcommand_is_named(tmp_path, checkpoint, capsys):
  rc, _ = convert(tmp_path / "a", {"model": checkpoint}, "sam3")
  assert rc == 1 and "python -m convert sam3i" in capsys.readouterr().err
  _, torch_model, _ = parity.reference_model("tiny")
  rc, _ = convert(tmp_path / "b", released_layout(torch_model), "sam3i")
  assert rc == 1 and "--adapters" in capsys.readouterr().err


def test_sam3_checkpoint_with_identity_adapters(tmp_path):
  """`convert sam3 --adapters`: SAM 3's weights, untrained adapters, every level computes SAM 3."""
  config, torch_model, _ = parity.reference_model("tiny")
  rc, out = convert(tmp_path, released_layout(torch_model), "sam3", "--adapters")
  assert rc == 0
  report = json.load(open(os.path.join(out, "conversion.json")))
  model = load_pretrained(out)
  params = {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  groups = {"simple adapters (identity: zero output projections)": (".adapter1.",),
            "complex adapters (identity: zero output projections)": (".adapter12.", ".adapter2."),
            "simple mask predictor (copy of mask_predictor)": ("mask_predictor_adapter1.",),
            "complex mask predictor (copy of mask_predictor)": ("mask_predictor_adapter2.",),
            "projection head (random)": ("simple_query_proj.",)}
  keys = param_table(model)  # PyTorch keys: one per layer of a stacked parameter
  assert report["initialised"] == {
      reason: sum(any(part in k for part in parts) for k in keys) for reason, parts in groups.items()}
  for key, value in params.items():
    if "mask_predictor_adapter" in key:
      source = key.replace(key.split(".")[1], "mask_predictor")
      np.testing.assert_array_equal(value, params[source], err_msg=key)
    elif ".adapter" in key and (".up_proj." in key or ".out_proj." in key):
      assert not value.any(), key
    elif ".adapter" in key and key.endswith("kernel"):
      assert np.abs(value).std() > 0, key  # input projections are random
  tokens = jnp.asarray(torch_model.backbone.language_backbone.tokenizer(
      ["the helmet of the rider on the black horse"], context_length=config.context_length).numpy())
  encode = jax.jit(lambda m, t, level: m.encode_text(t, level).tokens, static_argnames="level",
                   compiler_options=parity.FAST_COMPILE)
  concept = encode(model, tokens, Level.CONCEPT)
  for level in (Level.SIMPLE, Level.COMPLEX):
    parity.assert_close(encode(model, tokens, level), concept, 1e-6, level.value)
