"""Hugging Face transformers' SAM 3 (`Sam3Model.save_pretrained`: config.json + model.safetensors,
possibly sharded) -> a converted directory that load_pretrained reads, and back (`export_hf_sam3`,
for `python -m convert export --format hf-sam3`: the same key rules run in reverse, over the key
list of transformers' own Sam3Model).

transformers renames every module and splits each fused attention projection into q/k/v; this
module maps its keys back to the layout of Meta's sam3.pt (which the Flax model mirrors) and then
converts as `python -m convert sam3` does. Sizes come from the config.json. What the port does not
hold is reported: its `Sam3Model` has no point prompts, so the geometry encoder's three point
projections start from a fresh initialisation, as in a new model. A `Sam3VideoModel` directory
(model_type "sam3_video": the detector under `detector_model.`) converts too; its tracker is
reported and left out.

Deviations of the transformers port from Meta's model (transformers 5.23), which the converted
model does not copy (it computes SAM 3 as Meta's code does):
- ViT LayerNorm eps: transformers' default `layer_norm_eps` is 1e-6, Meta's ViT uses 1e-5; a config
  that says otherwise is reported (outputs then differ by ~1e-5 relative).
- With no box prompt, transformers skips the geometry encoder, whose learned CLS token Meta (and
  this model) always appends to the prompt, so text-only outputs differ.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import numpy as np

from convert.checkpoint_io import LazyTensor, TensorStore, read_checkpoint
from convert.export import TEXT_PROJECTION_DIM
from convert.sam3 import UNUSED_TEXT_PROJECTION, convert_store
from convert.torch_layout import ConversionError, LoadReport
from sam3i_jax.models.config import Sam3Config, get_preset

_TRUNK = "backbone.vision_backbone.trunk."
_TEXT = "backbone.language_backbone.encoder."
META_VIT_LAYER_NORM_EPS = 1e-5


def _mlp(meta: str) -> Callable[[re.Match], str]:
  """transformers' `layerN` (1-based) of a small MLP -> Meta's `layers.{N-1}`."""
  return lambda m: f"{meta}.layers.{int(m['n']) - 1}."


# transformers key (after q/k/v fusion) -> Meta key: (pattern, replacement), first match wins.
_RULES: list[tuple[str, str | Callable]] = [
    # ViT trunk
    (r"vision_encoder\.backbone\.embeddings\.position_embeddings$", _TRUNK + "pos_embed"),
    (r"vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.", _TRUNK + "patch_embed.proj."),
    (r"vision_encoder\.backbone\.layer_norm\.", _TRUNK + "ln_pre."),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.layer_norm([12])\.", _TRUNK + r"blocks.\1.norm\2."),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.attention\.in_proj_", _TRUNK + r"blocks.\1.attn.qkv."),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.attention\.o_proj\.", _TRUNK + r"blocks.\1.attn.proj."),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.mlp\.", _TRUNK + r"blocks.\1.mlp."),
    # FPN neck (the scale layers are named by the level's scale factor: _neck_scale_layer)
    (r"vision_encoder\.neck\.fpn_layers\.(\d+)\.proj1\.", r"backbone.vision_backbone.convs.\1.conv_1x1."),
    (r"vision_encoder\.neck\.fpn_layers\.(\d+)\.proj2\.", r"backbone.vision_backbone.convs.\1.conv_3x3."),
    # text encoder (CLIP) and the resizer
    (r"text_encoder\.text_model\.embeddings\.token_embedding\.", _TEXT + "token_embedding."),
    (r"text_encoder\.text_model\.embeddings\.position_embedding\.weight$", _TEXT + "positional_embedding"),
    (r"text_encoder\.text_model\.final_layer_norm\.", _TEXT + "ln_final."),
    (r"text_encoder\.text_projection\.weight$", _TEXT + "text_projection"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.(in_proj_|out_proj\.)",
     _TEXT + r"transformer.resblocks.\1.attn.\2"),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.",
     _TEXT + r"transformer.resblocks.\1.ln_\2."),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", _TEXT + r"transformer.resblocks.\1.mlp.c_fc."),
    (r"text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", _TEXT + r"transformer.resblocks.\1.mlp.c_proj."),
    (r"text_projection\.", "backbone.language_backbone.resizer."),
    # geometry encoder
    (r"geometry_encoder\.layers\.(\d+)\.cross_attn\.", r"geometry_encoder.encode.\1.cross_attn_image."),
    (r"geometry_encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"geometry_encoder.encode.\1.linear\2."),
    (r"geometry_encoder\.layers\.(\d+)\.layer_norm([123])\.", r"geometry_encoder.encode.\1.norm\2."),
    (r"geometry_encoder\.layers\.(\d+)\.", r"geometry_encoder.encode.\1."),
    (r"geometry_encoder\.vision_layer_norm\.", "geometry_encoder.img_pre_norm."),
    (r"geometry_encoder\.prompt_layer_norm\.", "geometry_encoder.norm."),
    (r"geometry_encoder\.output_layer_norm\.", "geometry_encoder.encode_norm."),
    (r"geometry_encoder\.", "geometry_encoder."),
    # fusion encoder
    (r"detr_encoder\.layers\.(\d+)\.cross_attn\.", r"transformer.encoder.layers.\1.cross_attn_image."),
    (r"detr_encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"detr_encoder\.layers\.(\d+)\.layer_norm([123])\.", r"transformer.encoder.layers.\1.norm\2."),
    (r"detr_encoder\.layers\.(\d+)\.", r"transformer.encoder.layers.\1."),
    # decoder (its norm1 is the image cross-attention's, norm2 the self-attention's)
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn\.", r"transformer.decoder.layers.\1.ca_text."),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"detr_decoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"detr_decoder\.layers\.(\d+)\.", r"transformer.decoder.layers.\1."),
    (r"detr_decoder\.output_layer_norm\.", "transformer.decoder.norm."),
    (r"detr_decoder\.presence_layer_norm\.", "transformer.decoder.presence_token_out_norm."),
    (r"detr_decoder\.box_head\.layer(?P<n>\d)\.", _mlp("transformer.decoder.bbox_embed")),
    (r"detr_decoder\.presence_head\.layer(?P<n>\d)\.", _mlp("transformer.decoder.presence_token_head")),
    (r"detr_decoder\.ref_point_head\.layer(?P<n>\d)\.", _mlp("transformer.decoder.ref_point_head")),
    (r"detr_decoder\.box_rpb_embed_x\.layer(?P<n>\d)\.", _mlp("transformer.decoder.boxRPB_embed_x")),
    (r"detr_decoder\.box_rpb_embed_y\.layer(?P<n>\d)\.", _mlp("transformer.decoder.boxRPB_embed_y")),
    (r"detr_decoder\.", "transformer.decoder."),
    # scoring and segmentation head
    (r"dot_product_scoring\.text_mlp\.layer(?P<n>\d)\.", _mlp("dot_prod_scoring.prompt_mlp")),
    (r"dot_product_scoring\.text_mlp_out_norm\.", "dot_prod_scoring.prompt_mlp.out_norm."),
    (r"dot_product_scoring\.text_proj\.", "dot_prod_scoring.prompt_proj."),
    (r"dot_product_scoring\.query_proj\.", "dot_prod_scoring.hs_proj."),
    (r"mask_decoder\.mask_embedder\.", "segmentation_head.mask_predictor.mask_embed."),
    (r"mask_decoder\.instance_projection\.", "segmentation_head.instance_seg_head."),
    (r"mask_decoder\.semantic_projection\.", "segmentation_head.semantic_seg_head."),
    (r"mask_decoder\.prompt_cross_attn_norm\.", "segmentation_head.cross_attn_norm."),
    (r"mask_decoder\.prompt_cross_attn\.", "segmentation_head.cross_attend_prompt."),
    (r"mask_decoder\.pixel_decoder\.", "segmentation_head.pixel_decoder."),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _RULES]
# The neck's `scale_layers.i` by the level's scale factor (scale_layers.1 of the 4x level is its GELU).
_SCALE_LAYERS = {(4.0, 0): "dconv_2x2_0", (4.0, 2): "dconv_2x2_1", (2.0, 0): "dconv_2x2"}
_QKV = re.compile(r"^(?P<module>.*)\.q_proj\.(?P<leaf>weight|bias)$")

# transformers' Sam3Model has no point prompts: these parameters are not in its checkpoints.
POINT_PROJECTIONS = ("point prompt projections (transformers' Sam3Model has no point prompts; "
                     "random, as in a new model)")
_TRACKER = "video tracker of a Sam3VideoModel (tracker_model.*, tracker_neck.*)"
HF_IGNORED = {
    **UNUSED_TEXT_PROJECTION,
    _TRACKER: lambda k: k.startswith(("tracker_model.", "tracker_neck.")),
}


def meta_key(key: str, scale_factors) -> str | None:
  """The sam3.pt key of a transformers key (q/k/v already fused into `in_proj_*`), or None."""
  m = re.fullmatch(r"vision_encoder\.neck\.fpn_layers\.(\d+)\.scale_layers\.(\d+)\.(weight|bias)", key)
  if m:
    level, index = int(m[1]), int(m[2])
    name = _SCALE_LAYERS.get((float(scale_factors[level]), index)) if level < len(scale_factors) else None
    return name and f"backbone.vision_backbone.convs.{level}.{name}.{m[3]}"
  for pattern, replacement in _COMPILED:
    m = pattern.match(key)
    if m:
      new = (replacement(m) if callable(replacement) else m.expand(replacement)) + key[m.end():]
      return new.replace(".o_proj.", ".out_proj.")  # nn.MultiheadAttention's name
  return None


def to_meta_layout(store: TensorStore, scale_factors) -> TensorStore:
  """transformers' tensors under sam3.pt's names: q/k/v concatenated (ViT `attn.qkv`, elsewhere
  `in_proj_*`), the ViT position table given back the row Meta keeps for its (never read) class
  token. Keys that map to nothing stay as they are, for the strict load to name."""
  import torch

  tensors = {}
  # q_proj first: each fusion consumes its k_proj and v_proj.
  for key in sorted(store, key=lambda k: not _QKV.match(k)):
    if key not in store:  # a k_proj or v_proj, fused already
      continue
    m = _QKV.match(key)
    if m:
      parts = [f"{m['module']}.{p}_proj.{m['leaf']}" for p in "qkv"]
      missing = [p for p in parts if p not in store]
      if missing:
        raise ConversionError(f"{store.source}: {key} has no {', '.join(missing)}")
      fused = torch.cat([store.raw(p) for p in parts], dim=0)
      for p in parts:
        del store[p]
      key, tensor = f"{m['module']}.in_proj_{m['leaf']}", fused
    else:
      tensor = store.stored(key)  # read when the converter takes it
      del store[key]
    if key.startswith(("tracker_model.", "tracker_neck.")):
      tensors[key] = tensor
      continue
    new = meta_key(key, scale_factors) or key
    if new == _TRUNK + "pos_embed":
      tensor = tensor.load() if isinstance(tensor, LazyTensor) else tensor
      tensor = torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)
    tensors[new] = tensor
  return TensorStore(tensors, store.source)


def _sub(config: dict, name: str) -> dict:
  if not isinstance(config.get(name), dict):
    raise ConversionError(f"config.json has no {name!r} section: is this a transformers Sam3Config?")
  return config[name]


def config_from_hf(hf: dict, log=print) -> Sam3Config:
  """Sam3Config from a transformers Sam3Config dict (config.json); refuses what the model cannot
  compute as Meta's SAM 3 does, reports the ViT LayerNorm eps deviation."""
  if hf.get("model_type") == "sam3_video":
    hf = _sub(hf, "detector_config")
  if hf.get("model_type") != "sam3":
    raise ConversionError(f"config.json model_type is {hf.get('model_type')!r}, not 'sam3' (Sam3Model) "
                          "or 'sam3_video'")
  vision = _sub(hf, "vision_config")
  vit = _sub(vision, "backbone_config")
  text = _sub(hf, "text_config")
  geometry, encoder, decoder, mask = (_sub(hf, f"{n}_config") for n in
                                      ("geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder"))
  problems = []
  if [float(s) for s in vision.get("scale_factors", [])] != [4.0, 2.0, 1.0, 0.5]:
    problems.append(f"vision_config.scale_factors {vision.get('scale_factors')} (SAM 3: [4, 2, 1, 0.5])")
  for section, entry in (("text_config", text), ("vision_config.backbone_config", vit)):
    if entry.get("hidden_act", "gelu") != "gelu":
      problems.append(f"{section}.hidden_act {entry['hidden_act']!r} (SAM 3: exact 'gelu')")
  d_model = vision["fpn_hidden_size"]
  for name, section in (("geometry_encoder", geometry), ("detr_encoder", encoder),
                        ("detr_decoder", decoder), ("mask_decoder", mask)):
    if section["hidden_size"] != d_model:
      problems.append(f"{name}_config.hidden_size {section['hidden_size']} != fpn_hidden_size {d_model}")
    if section["num_attention_heads"] != encoder["num_attention_heads"]:
      problems.append(f"{name}_config.num_attention_heads differs from detr_encoder_config's")
  for name, section in (("geometry_encoder", geometry), ("detr_decoder", decoder)):
    if section["intermediate_size"] != encoder["intermediate_size"]:
      problems.append(f"{name}_config.intermediate_size differs from detr_encoder_config's")
  if text["intermediate_size"] % text["hidden_size"]:
    problems.append("text_config.intermediate_size is not a multiple of its hidden_size")
  if problems:
    raise ConversionError("this transformers config describes a model other than SAM 3's "
                          "architecture:\n  " + "\n  ".join(problems))
  eps = vit.get("layer_norm_eps", META_VIT_LAYER_NORM_EPS)
  if eps != META_VIT_LAYER_NORM_EPS:
    log(f"note: the config's ViT layer_norm_eps is {eps:g} (transformers' default); SAM 3's ViT, and "
        f"this model, use {META_VIT_LAYER_NORM_EPS:g}: outputs differ from transformers' by ~1e-5")
  config = get_preset("full").replace(
      img_size=vit["image_size"], pretrain_img_size=vit["pretrain_image_size"],
      patch_size=vit["patch_size"], vit_dim=vit["hidden_size"], vit_depth=vit["num_hidden_layers"],
      vit_heads=vit["num_attention_heads"],
      vit_mlp_ratio=vit["intermediate_size"] / vit["hidden_size"], window_size=vit["window_size"],
      global_att_blocks=tuple(vit["global_attn_indexes"]), d_model=d_model,
      num_heads=encoder["num_attention_heads"], dim_feedforward=encoder["intermediate_size"],
      num_enc_layers=encoder["num_layers"], num_dec_layers=decoder["num_layers"],
      num_queries=decoder["num_queries"], num_geo_layers=geometry["num_layers"],
      roi_size=geometry["roi_size"], text_width=text["hidden_size"],
      text_heads=text["num_attention_heads"], text_layers=text["num_hidden_layers"],
      text_mlp_ratio=text["intermediate_size"] // text["hidden_size"],
      context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"])
  if config.vit_mlp_dim != vit["intermediate_size"]:
    raise ConversionError(f"vision_config.backbone_config.intermediate_size {vit['intermediate_size']} "
                          "is not a whole multiple of hidden_size that this model can represent")
  return config


def read_hf_checkpoint(path: str) -> tuple[TensorStore, dict, str]:
  """(tensors, config.json, source) of a save_pretrained directory, or of a model.safetensors
  with its config.json beside it; a sharded directory (model.safetensors.index.json) is read whole."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: transformers keeps the sizes there")
  with open(config_path) as f:
    config = json.load(f)
  if not os.path.isdir(path):
    return read_checkpoint(path), config, path
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    stores = [read_checkpoint(os.path.join(path, shard)) for shard in shards]
    return TensorStore({k: s.stored(k) for s in stores for k in s}, index), config, path
  weights = os.path.join(path, "model.safetensors")
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
  return read_checkpoint(weights), config, path


def convert_hf_sam3(checkpoint: str, output: str, *, vocab_path: str | None = None,
                    log=print) -> LoadReport:
  """Converts a transformers SAM 3 checkpoint (directory or model.safetensors) into `output`."""
  start = time.time()
  store, hf_config, source = read_hf_checkpoint(checkpoint)
  config = config_from_hf(hf_config, log)
  store = store.rename(lambda k: k.removeprefix("detector_model."))
  store = to_meta_layout(store, config.neck_scale_factors)
  points = re.compile(r"^geometry_encoder\.points_").search
  return convert_store(store, source, output, config, ignore=HF_IGNORED,
                       fresh={POINT_PROJECTIONS: points}, vocab_path=vocab_path, log=log, start=start)


_QKV_PART = re.compile(r"^(?P<module>.*)\.(?P<part>[qkv])_proj\.(?P<leaf>weight|bias)$")
_HF_TEXT_PROJECTION = "text_encoder.text_projection.weight"


def hf_config_of(config: Sam3Config):
  """transformers' Sam3Config for the model of `config` (the inverse of config_from_hf), with SAM
  3's ViT LayerNorm eps so that transformers computes what this model computes."""
  try:
    from transformers.models.sam3 import configuration_sam3 as hf
  except ImportError as e:
    raise ConversionError("exporting to transformers' layout needs transformers: "
                          "pip install -e '.[convert,hf]'") from e

  if config.variant != "sam3":
    raise ConversionError(f"transformers' Sam3Model holds SAM 3's detector; a {config.variant} model "
                          "(three neck levels, joint box scores) has no transformers layout: export "
                          "it with --format sam3")
  vit = hf.Sam3ViTConfig(
      hidden_size=config.vit_dim, intermediate_size=config.vit_mlp_dim,
      num_hidden_layers=config.vit_depth, num_attention_heads=config.vit_heads,
      image_size=config.img_size, patch_size=config.patch_size,
      pretrain_image_size=config.pretrain_img_size, window_size=config.window_size,
      global_attn_indexes=list(config.global_att_blocks), layer_norm_eps=META_VIT_LAYER_NORM_EPS)
  common = dict(hidden_size=config.d_model, num_attention_heads=config.num_heads,
                intermediate_size=config.dim_feedforward)
  return hf.Sam3Config(
      vision_config=hf.Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=config.d_model,
                                        scale_factors=list(config.neck_scale_factors)),
      text_config=dict(vocab_size=config.vocab_size, hidden_size=config.text_width,
                       intermediate_size=config.text_mlp_ratio * config.text_width,
                       projection_dim=TEXT_PROJECTION_DIM, num_hidden_layers=config.text_layers,
                       num_attention_heads=config.text_heads,
                       max_position_embeddings=config.context_length, hidden_act="gelu"),
      geometry_encoder_config=hf.Sam3GeometryEncoderConfig(
          num_layers=config.num_geo_layers, roi_size=config.roi_size, **common),
      detr_encoder_config=hf.Sam3DETREncoderConfig(num_layers=config.num_enc_layers, **common),
      detr_decoder_config=hf.Sam3DETRDecoderConfig(num_layers=config.num_dec_layers,
                                                   num_queries=config.num_queries, **common),
      mask_decoder_config=hf.Sam3MaskDecoderConfig(hidden_size=config.d_model,
                                                   num_attention_heads=config.num_heads))


def _hf_tensor(key: str, shape: tuple, state: dict, scale_factors, used: set):
  """transformers' tensor `key` from the sam3.pt-layout `state` (q/k/v cut out of the fused
  projection, the ViT position table without the class-token row), or None if it has no source."""
  m = _QKV_PART.match(key)
  source = meta_key(f"{m['module']}.in_proj_{m['leaf']}" if m else key, scale_factors)
  if source not in state:
    return None
  used.add(source)
  tensor = state[source]
  if m:
    n = tensor.shape[0] // 3
    tensor = tensor["qkv".index(m["part"]) * n:("qkv".index(m["part"]) + 1) * n]
  elif source == _TRUNK + "pos_embed":
    tensor = tensor[:, 1:]
  if tuple(tensor.shape) != shape:
    raise ConversionError(f"{key}: {tuple(tensor.shape)} from {source}, transformers expects {shape}")
  return tensor


def export_hf_sam3(config: Sam3Config, state: dict, output: str, *, dtype: str, report) -> dict:
  """transformers' Sam3Model tensors {key: array} from `state` (the model's parameters in
  sam3.pt's layout, SAM 3 only), and its config.json written into the new directory `output`.
  The key list and shapes come from transformers' own Sam3Model, built on the meta device."""
  import torch
  import transformers

  hf_config = hf_config_of(config)
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in transformers.Sam3Model(hf_config).state_dict().items()}
  used, tensors = set(), {}
  for key, shape in shapes.items():
    tensor = _hf_tensor(key, shape, state, config.neck_scale_factors, used)
    if tensor is None:
      if key != _HF_TEXT_PROJECTION:
        raise ConversionError(f"transformers' {key} {shape} has no parameter in the model")
      tensor = np.zeros(shape, np.float32)
      report.written["unused text projection (text_encoder.text_projection): zeros (SAM 3 never "
                     "reads it; the converter does not keep it)"] = 1
    tensors[key] = tensor
  left = sorted(set(state) - used)
  points = [k for k in left if k.startswith("geometry_encoder.points_")]
  if len(points) != len(left):
    raise ConversionError("parameters with no transformers key:\n  " + "\n  ".join(
        k for k in left if k not in points))
  if points:
    report.left_out["point prompt projections (geometry_encoder.points_*): transformers' "
                    "Sam3Model has no point prompts"] = len(points)
  report.notes.append("the directory holds the model only; take the processor (tokenizer, image "
                      "processor) from facebook/sam3")
  os.makedirs(output)
  hf_config.dtype = dtype
  hf_config.save_pretrained(output)
  return tensors
