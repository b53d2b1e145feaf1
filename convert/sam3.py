"""Meta's `sam3.pt` (or a safetensors copy) -> a converted directory that load_pretrained reads."""

from __future__ import annotations

import json
import math
import re
import time

import jax
import numpy as np
from flax import nnx

from convert.checkpoint_io import TensorStore, read_checkpoint
from convert.torch_layout import ConversionError, LoadReport, load_state_dict, param_table
from sam3i_jax.models.adapters import (ADDITIONS, MASK_PREDICTOR_COPIES, addition_of,
                                       copy_mask_predictor)
from sam3i_jax.models.config import Sam3Config, get_preset
from sam3i_jax.models.sam3 import Sam3Image, abstract_model, host_counted_rngs
from sam3i_jax.models.vit import rope_tables

_NECK = "backbone.vision_backbone."


def _under(prefix: str):
  return lambda k: k.startswith(prefix)


# Tensors of a SAM 3 / SAM 3.1 checkpoint that the image model knowingly does not use (reported,
# never silent), by variant (sam3i_jax.models.config.VARIANTS).
UNUSED_TEXT_PROJECTION = {
    "unused text projection (text_projection)":
        lambda k: k == "backbone.language_backbone.encoder.text_projection",
}
_IGNORED_IN_BOTH = {
    "video tracker (tracker.*)": _under("tracker."),
    "RoPE tables (freqs_cis; verified, then recomputed)": lambda k: k.endswith(".attn.freqs_cis"),
    **UNUSED_TEXT_PROJECTION,
}
# The tracker's neck branches of each variant, reported as ignored. They are copies of `convs` in
# layout, checked tensor by tensor (check_neck_copies), so that a stray tensor under their names is
# an error, not silently ignored.
NECK_COPIES = {
    "sam3": {"sam2_convs": "SAM 2 neck copy for the interactive tracker (sam2_convs)"},
    "sam3.1": {"interactive_convs": "the tracker's interactive neck (interactive_convs)",
               "propagation_convs": "the tracker's propagation neck (propagation_convs)"},
}

IGNORED_BY_VARIANT = {
    variant: {**_IGNORED_IN_BOTH,
              **{reason: _under(f"{_NECK}{branch}.") for branch, reason in branches.items()}}
    for variant, branches in NECK_COPIES.items()}
IGNORED_GROUPS = IGNORED_BY_VARIANT["sam3"]  # sam3.pt's, which SAM3-I checkpoints share
VARIANT_NAMES = {"sam3": "SAM 3 (sam3.pt layout)",
                 "sam3.1": "SAM 3.1 (sam3.1_multiplex.pt layout; its detector is converted)"}
# Only SAM 3.1's vision neck has a propagation branch.
SAM31_MARKER = _NECK + "propagation_convs.0.conv_1x1.weight"

_TRUNK = _NECK + "trunk."
_TEXT = "backbone.language_backbone."


def strip_detector_prefix(store: TensorStore) -> TensorStore:
  """`detector.X` -> `X`; `tracker.*` keys are kept as they are (and then ignored)."""
  return store.rename(lambda k: k[len("detector."):] if k.startswith("detector.") else k)


def detect_variant(store: TensorStore) -> str:
  """"sam3.1" for the detector of sam3.1_multiplex.pt (or a repackage of it), else "sam3"."""
  return "sam3.1" if SAM31_MARKER in store else "sam3"


def check_neck_copies(store: TensorStore, variant: str) -> None:
  """Every tensor of the variant's tracker neck branches must mirror one of `convs` (same name
  after the branch, same shape): the converter ignores these branches, so anything else under
  their names is a tensor it does not know."""
  strays = []
  for branch in NECK_COPIES[variant]:
    prefix = f"{_NECK}{branch}."
    for key in (k for k in store if k.startswith(prefix)):
      mirror = f"{_NECK}convs.{key[len(prefix):]}"
      if mirror not in store or store.shape(mirror) != store.shape(key):
        strays.append(f"{key} {store.shape(key)}: "
                      + (f"{mirror} is {store.shape(mirror)}" if mirror in store else f"no {mirror}"))
  if strays:
    raise ConversionError("tensors under the tracker's neck branches that do not mirror the "
                          "detector's `convs`:\n  " + "\n  ".join(strays))


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
  adapter = _TEXT + "encoder.transformer.resblocks.0.adapter1."
  if adapter + "down_proj.weight" in store:
    sizes.update(
        adapters=True,
        text_adapter_bottleneck=shape(adapter + "down_proj.weight")[0],
        adapter_bottleneck=shape("transformer.encoder.layers.0.adapter1.down_proj.weight")[0])
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


def sam3i_fresh(names=tuple(ADDITIONS)) -> dict:
  """convert_store's `fresh` for the named groups of SAM3-I's additions (models.adapters.ADDITIONS),
  initialised as SAM3-I adds them to a SAM 3 model: {reason: predicate}."""
  return {f"{name} ({ADDITIONS[name].initial})": re.compile(ADDITIONS[name].pattern).search
          for name in names}


def convert_sam3(checkpoint: str, output: str, *, base: Sam3Config | None = None,
                 vocab_path: str | None = None, adapters: bool = False, log=print) -> LoadReport:
  """Converts `checkpoint` into `output` (see sam3i_jax.pretrained). Raises ConversionError listing
  missing, unexpected and mis-shaped tensors; ignored groups are logged and recorded.

  adapters: build the SAM3-I model instead; its additions start as SAM3-I's stage 1 does (identity
  adapters, so every level computes SAM 3's output until trained).
  """
  start = time.time()
  store = strip_detector_prefix(read_checkpoint(checkpoint))
  if any(addition_of(k) for k in store):
    raise ConversionError(f"{checkpoint} holds SAM3-I parameters: convert it with "
                          "`python -m convert sam3i`")
  variant = detect_variant(store)
  log(f"{checkpoint}: a {VARIANT_NAMES[variant]} checkpoint (variant {variant!r})")
  check_neck_copies(store, variant)
  config = (base or get_preset("full")).replace(variant=variant,
                                                **({"adapters": True} if adapters else {}))
  return convert_store(store, checkpoint, output, config, ignore=IGNORED_BY_VARIANT[variant],
                       fresh=sam3i_fresh() if adapters else {}, vocab_path=vocab_path, log=log,
                       start=start)


def convert_store(store: TensorStore, source: str, output: str, base: Sam3Config, *,
                  ignore: dict, fresh: dict, vocab_path: str | None, log, start: float) -> LoadReport:
  """The conversion shared by SAM 3 and SAM3-I checkpoints: sizes checked against the shapes, a
  strict load in which only whole `fresh` groups may be absent (then initialised), save."""
  from sam3i_jax.pretrained import save_pretrained
  from sam3i_jax.tokenizer import find_vocab

  total = len(store)
  source_dtypes = store.dtypes()
  config = resolve_config(store, base)
  log(f"read {total} tensors from {source} ({_counts(source_dtypes)}); model config checked "
      "against their shapes")
  upcast = {d: n for d, n in source_dtypes.items() if d in ("float16", "bfloat16")}
  if upcast:
    log(f"upcast {_counts(upcast)} tensors to float32")
  verified = verify_rope_tables(store, config)
  log(f"verified {verified} RoPE tables against the recomputed ones" if verified else
      "no RoPE tables (freqs_cis) in the checkpoint: the model computes them")
  model = abstract_model(config)
  report = load_state_dict(model, store, ignore=ignore, fresh=fresh, strict=False)
  partial = [reason for reason in report.fresh if any(fresh[reason](k) for k in report.loaded)]
  if partial or not report.ok:
    raise ConversionError("checkpoint does not fit the model:\n" + report.summary() +
                          "".join(f"\ngroup only partly in the checkpoint: {r}" for r in partial))
  for reason, keys in report.ignored.items():
    log(f"ignored {len(keys)} tensors: {reason}")
  log(f"loaded {len(report.loaded)} tensors into the Flax model")
  for reason, keys in report.fresh.items():
    log(f"not in the checkpoint, initialised {len(keys)} parameters: {reason}")
  initialise(model, config, [k for keys in report.fresh.values() for k in keys])
  vocab = vocab_path or find_vocab()
  summary = {"source": source, "variant": config.variant, "source_dtypes": source_dtypes,
             "tensors_in_checkpoint": total, "loaded": len(report.loaded),
             "ignored": {r: len(k) for r, k in report.ignored.items()},
             "initialised": {r: len(k) for r, k in report.fresh.items()}, "config": config.to_dict()}
  save_pretrained(model, config, output, vocab_path=vocab, report=summary)
  log(f"wrote {output} in {time.time() - start:.1f}s")
  return report


def _counts(counts: dict[str, int]) -> str:
  return ", ".join(f"{n} {name}" for name, n in counts.items())


def initialise(model: nnx.Module, config: Sam3Config, keys: list[str], seed: int = 0) -> None:
  """Fills the parameters `keys` (PyTorch-style keys) of the partly loaded `model` with the values a
  new model built from `seed` has (only their initialisers run: the rest of the new model is traced,
  then dropped by XLA); mask-predictor copies then take the loaded mask_predictor's values."""
  wanted = set(keys)
  if not wanted:
    return

  @jax.jit
  def initial_values():
    new = Sam3Image(config, rngs=host_counted_rngs(seed))
    return {entry.path: entry.param[...] for key, entry in param_table(new).items()
            if key in wanted}

  # By parameter, not by key: a stacked parameter has one key per layer (a fresh group is
  # always whole, so every layer of it is fresh).
  params = {entry.path: entry.param for key, entry in param_table(model).items() if key in wanted}
  for path, value in initial_values().items():
    params[path].set_value(value)
  if any(addition_of(k) in MASK_PREDICTOR_COPIES for k in wanted):
    nnx.update(model, copy_mask_predictor(nnx.state(model, nnx.Param)))


def load_model_config(preset: str, model_config_json: str | None) -> Sam3Config:
  base = get_preset(preset)
  if model_config_json:
    with open(model_config_json) as f:
      base = base.replace(**json.load(f))
  return base
