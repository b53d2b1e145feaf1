"""Meta's `sam3.pt` (or a safetensors copy) -> a converted directory that load_pretrained reads."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
from flax import nnx

from convert.checkpoint_io import TensorStore, read_checkpoint
from convert.torch_layout import ConversionError, LoadReport, load_state_dict
from sam3i_jax.models.config import Sam3Config, get_preset
from sam3i_jax.models.vit import rope_tables

# Tensors of sam3.pt that the image model knowingly does not use (reported, never silent).
IGNORED_GROUPS = {
    "video tracker (tracker.*)": lambda k: k.startswith("tracker."),
    "SAM 2 neck copy for the interactive tracker (sam2_convs)":
        lambda k: k.startswith("backbone.vision_backbone.sam2_convs."),
    "RoPE tables (freqs_cis; verified, then recomputed)": lambda k: k.endswith(".attn.freqs_cis"),
    "unused text projection (text_projection)":
        lambda k: k == "backbone.language_backbone.encoder.text_projection",
}

_TRUNK = "backbone.vision_backbone.trunk."
_TEXT = "backbone.language_backbone."


def strip_detector_prefix(store: TensorStore) -> TensorStore:
  """`detector.X` -> `X`; `tracker.*` keys are kept as they are (and then ignored)."""
  return store.rename(lambda k: k[len("detector."):] if k.startswith("detector.") else k)


def _count(store: TensorStore, pattern: str) -> int:
  regex = re.compile(pattern)
  return len({m.group(1) for k in store for m in [regex.match(k)] if m})


def infer_sizes(store: TensorStore) -> dict:
  """The Sam3Config fields that tensor shapes determine."""
  def shape(key):
    if key not in store:
      raise ConversionError(f"{store.source}: required tensor {key} is missing; is this a SAM 3 checkpoint?")
    return store.shape(key)

  vit_dim, _, patch, _ = shape(_TRUNK + "patch_embed.proj.weight")
  sizes = dict(
      patch_size=patch,
      vit_dim=vit_dim,
      vit_depth=_count(store, re.escape(_TRUNK) + r"blocks\.(\d+)\."),
      vit_mlp_dim=shape(_TRUNK + "blocks.0.mlp.fc1.weight")[0],
      pretrain_img_size=math.isqrt(shape(_TRUNK + "pos_embed")[1] - 1) * patch,
      d_model=shape(_TEXT + "resizer.weight")[0],
      text_width=shape(_TEXT + "encoder.token_embedding.weight")[1],
      vocab_size=shape(_TEXT + "encoder.token_embedding.weight")[0],
      context_length=shape(_TEXT + "encoder.positional_embedding")[0],
      text_layers=_count(store, re.escape(_TEXT) + r"encoder\.transformer\.resblocks\.(\d+)\."),
      dim_feedforward=shape("transformer.encoder.layers.0.linear1.weight")[0],
      num_enc_layers=_count(store, r"transformer\.encoder\.layers\.(\d+)\."),
      num_dec_layers=_count(store, r"transformer\.decoder\.layers\.(\d+)\."),
      num_queries=shape("transformer.decoder.query_embed.weight")[0],
      num_geo_layers=_count(store, r"geometry_encoder\.encode\.(\d+)\."),
      roi_size=shape("geometry_encoder.boxes_pool_project.weight")[-1],
  )
  # The RoPE tables, when present, tell the window size, the global blocks and the image size.
  rope = {int(m.group(1)): store.shape(k) for k in store
          for m in [re.match(re.escape(_TRUNK) + r"blocks\.(\d+)\.attn\.freqs_cis$", k)] if m}
  if rope:
    rows = {i: s[0] for i, s in rope.items()}
    largest = max(rows.values())
    sizes["global_att_blocks"] = tuple(sorted(i for i, r in rows.items() if r == largest))
    sizes["img_size"] = math.isqrt(largest) * patch
    window_rows = {r for r in rows.values() if r != largest}
    if window_rows:
      sizes["window_size"] = math.isqrt(window_rows.pop())
  return sizes


def resolve_config(store: TensorStore, base: Sam3Config) -> Sam3Config:
  """`base` (a preset or --model-config) with every shape-determined field checked against the checkpoint."""
  sizes = infer_sizes(store)
  conflicts = [f"{k}: checkpoint says {v!r}, config says {getattr(base, k)!r}"
               for k, v in sizes.items() if getattr(base, k) != v]
  if conflicts:
    raise ConversionError("the checkpoint's shapes disagree with the model config (pass a matching "
                          "--preset or --model-config):\n  " + "\n  ".join(conflicts))
  return base


def verify_rope_tables(store: TensorStore, config: Sam3Config) -> int:
  """Checks the checkpoint's `freqs_cis` buffers against the RoPE tables the model recomputes (they
  fix head size, window size, global blocks and position scale); returns how many were checked."""
  head_dim = config.vit_dim // config.vit_heads
  checked = 0
  for block in range(config.vit_depth):
    key = f"{_TRUNK}blocks.{block}.attn.freqs_cis"
    if key not in store:
      continue
    is_global = block in config.global_att_blocks
    side = config.grid_size if is_global else config.window_size
    cos, sin = rope_tables(head_dim, side, side, config.window_size / config.grid_size if is_global else 1.0)
    table = store[key]
    if table.shape != cos.shape or not (np.allclose(table.real, cos, atol=1e-5)
                                        and np.allclose(table.imag, sin, atol=1e-5)):
      raise ConversionError(
          f"{key} {table.shape} differs from the RoPE table of a {'global' if is_global else 'window'} "
          f"block with head size {head_dim} {cos.shape}: check vit_heads / window_size of the config")
    checked += 1
  return checked


def convert_sam3(checkpoint: str, output: str, *, base: Sam3Config | None = None,
                 vocab_path: str | None = None, log=print) -> LoadReport:
  """Converts `checkpoint` into `output` (see sam3i_jax.pretrained). Raises ConversionError listing
  missing, unexpected and mis-shaped tensors; ignored groups are logged and recorded."""
  from sam3i_jax.models.sam3 import Sam3Image
  from sam3i_jax.pretrained import save_pretrained
  from sam3i_jax.tokenizer import find_vocab

  start = time.time()
  store = strip_detector_prefix(read_checkpoint(checkpoint))
  total = len(store)
  config = resolve_config(store, base or get_preset("full"))
  log(f"read {total} tensors from {checkpoint}; model config checked against their shapes")
  log(f"verified {verify_rope_tables(store, config)} RoPE tables against the recomputed ones")
  model = nnx.eval_shape(lambda: Sam3Image(config, rngs=nnx.Rngs(0)))
  report = load_state_dict(model, store, ignore=IGNORED_GROUPS)
  for reason, keys in report.ignored.items():
    log(f"ignored {len(keys)} tensors: {reason}")
  log(f"loaded {len(report.loaded)} tensors into the Flax model")
  vocab = vocab_path or find_vocab()
  summary = {"source": checkpoint, "tensors_in_checkpoint": total, "loaded": len(report.loaded),
             "ignored": {r: len(k) for r, k in report.ignored.items()}, "config": config.to_dict()}
  save_pretrained(model, config, output, vocab_path=vocab, report=summary)
  log(f"wrote {output} in {time.time() - start:.1f}s")
  return report


def load_model_config(preset: str, model_config_json: str | None) -> Sam3Config:
  base = get_preset(preset)
  if model_config_json:
    with open(model_config_json) as f:
      base = base.replace(**json.load(f))
  return base
