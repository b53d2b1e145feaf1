"""A converted or trained model directory -> the PyTorch layouts that other tools read.

  sam3     Meta's sam3.pt: {"model": {"detector.<key>": tensor}} (torch.save), or with
           `safetensors` the same keys in a .safetensors file (as the SAM 3.1 fp16 repackage).
           A SAM 3.1 model is written in the SAM 3.1 detector layout.
  hf-sam3  transformers' Sam3Model.save_pretrained directory (convert/hf_sam3.py).
  sam3i    the SAM3-I authors' training checkpoint: {"model": {<key>: tensor}}, no prefix,
           adapters, mask-predictor copies and projection head included.

Every parameter of the model is written under the key its importer reads it from (the inverse of
convert.torch_layout.load_state_dict), so import -> export -> import gives the same parameters bit
for bit. Besides the parameters, a format holds tensors the Flax model does not keep:
- the ViT's RoPE tables (`freqs_cis`, complex64 buffers): recomputed as Meta's ViT computes them;
  safetensors cannot hold complex tensors, so there they are left out (Meta's model computes them
  when it is built), as in the SAM 3.1 fp16 repackage;
- the text encoder's `text_projection`, which SAM 3 never uses (the importers skip it): copied
  from the original checkpoint given with `tracker_from`, else written as zeros;
- the video tracker (`tracker.*`) and the tracker's neck copies (`sam2_convs`; SAM 3.1:
  `interactive_convs`, `propagation_convs`): copied from `tracker_from` (the checkpoint the model
  was converted from), else left out, so that the file serves the image predictor only;
- SAM3-I only: the dead duplicate text encoder `backbone.text.*` (a copy of the live one: the
  authors' model registers it but never runs it) and the shared projection head under its other
  two names.
What a format cannot hold is refused, or left out with `drop_adapters`, and every such group is
reported by name: nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from convert.checkpoint_io import read_checkpoint
from convert.sam3 import _NECK, _TRUNK, NECK_COPIES, detect_variant, strip_detector_prefix
from convert.torch_layout import ConversionError, torch_state_dict
from sam3i_jax.models.adapters import addition_of
from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.vit import ROPE_THETA

FORMATS = {
    "sam3": "Meta's sam3.pt layout (detector.*; SAM 3.1 models in sam3.1_multiplex.pt's detector "
            "layout); read by sam3.model_builder and tools built on it",
    "hf-sam3": "transformers' Sam3Model save_pretrained directory (config.json + model.safetensors)",
    "sam3i": "the SAM3-I authors' checkpoint layout ({'model': ...}, adapters included)",
}
DTYPES = ("float32", "bfloat16", "float16")

TEXT_PROJECTION = "backbone.language_backbone.encoder.text_projection"
TEXT_PROJECTION_DIM = 512  # the output_dim Meta's builder gives the (unused) CLIP projection
_HEAD, _HEAD_COPIES = "simple_query_proj.", ("complex_query_proj.", "concept_proj.")
_LIVE_TEXT, _DEAD_TEXT = "backbone.language_backbone.", "backbone.text."


@dataclasses.dataclass
class ExportReport:
  """What an export wrote, made up, copied and left out (reason -> number of tensors)."""
  path: str
  format: str
  tensors: int = 0
  bytes: int = 0
  written: dict[str, int] = dataclasses.field(default_factory=dict)  # tensors the model lacks
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"wrote {self.tensors} tensors ({self.bytes / 1e9:.2f} GB) to {self.path} "
             f"({self.format})"]
    lines += [f"  also written: {n} tensors: {reason}" for reason, n in self.written.items()]
    lines += [f"  left out: {n} tensors: {reason}" for reason, n in self.left_out.items()]
    lines += [f"  note: {note}" for note in self.notes]
    return "\n".join(lines)


def rope_freqs_cis(config: Sam3Config):
  """{key: complex64 tensor} of the ViT's RoPE buffers, computed as Meta's ViT computes them
  (float32 positions and frequencies, torch.polar): window blocks on the window grid at scale 1,
  global blocks on the token grid at scale window / grid."""
  import torch

  head_dim = config.vit_dim // config.vit_heads
  freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))

  def table(side: int, scale: float):
    t = torch.arange(side * side, dtype=torch.float32)
    x = (t % side).float() * scale
    y = torch.div(t, side, rounding_mode="floor").float() * scale
    angles = [torch.outer(x, freqs), torch.outer(y, freqs)]
    return torch.cat([torch.polar(torch.ones_like(a), a) for a in angles], dim=-1)

  window = table(config.window_size, 1.0)
  full = table(config.grid_size, config.window_size / config.grid_size)
  return {f"{_TRUNK}blocks.{i}.attn.freqs_cis": full if i in config.global_att_blocks else window
          for i in range(config.vit_depth)}


def _additions(state: dict) -> dict[str, list[str]]:
  """SAM3-I's parameters in `state`, by group (models.adapters.ADDITIONS)."""
  groups: dict[str, list[str]] = {}
  for key in state:
    group = addition_of(key)
    if group is not None:
      groups.setdefault(group, []).append(key)
  return groups


def _without_additions(state: dict, drop_adapters: bool, fmt: str, report: ExportReport) -> dict:
  groups = _additions(state)
  if groups and not drop_adapters:
    listed = ", ".join(f"{name} ({len(keys)} tensors)" for name, keys in groups.items())
    raise ConversionError(
        f"the {fmt} layout has no place for SAM3-I's parameters: {listed}. Export with "
        "--format sam3i to keep them, or pass --drop-adapters to write SAM 3 alone (the model "
        "then computes SAM 3's concept-level output)")
  for name, keys in groups.items():
    report.left_out[f"SAM3-I's {name} (--drop-adapters)"] = len(keys)
    for key in keys:
      del state[key]
  return state


class _Original:
  """The checkpoint the model was converted from (`tracker_from`), checked against the model."""

  def __init__(self, path: str, variant: str, state: dict):
    self.store = strip_detector_prefix(read_checkpoint(path, mmap=True))
    self.path = path
    found = detect_variant(self.store)
    if found != variant:
      raise ConversionError(f"{path} is a {found} checkpoint but the model is {variant}: give the "
                            "checkpoint the model was converted from")
    wrong = [f"{k}: {self.store.shape(k)} there, {tuple(v.shape)} in the model"
             for k, v in state.items() if k in self.store and self.store.shape(k) != tuple(v.shape)]
    if wrong:
      raise ConversionError(f"{path} does not hold the model's architecture:\n  " + "\n  ".join(wrong[:20]))

  def keys(self, prefixes: tuple[str, ...]) -> list[str]:
    return [k for k in self.store if k.startswith(prefixes)]


def _text_projection(config: Sam3Config, original: _Original | None, report: ExportReport):
  import torch

  if original is not None and TEXT_PROJECTION in original.store:
    report.written[f"unused text projection (text_projection), from {original.path}"] = 1
    return original.store.raw(TEXT_PROJECTION)
  report.written["unused text projection (text_projection): zeros (SAM 3 never reads it; the "
                 "converter does not keep it)"] = 1
  return torch.zeros(config.text_width, TEXT_PROJECTION_DIM)


def _sam3_tensors(config: Sam3Config, state: dict, *, safetensors: bool, drop_adapters: bool,
                  tracker_from: str | None, report: ExportReport) -> dict:
  state = _without_additions(state, drop_adapters, "sam3", report)
  original = _Original(tracker_from, config.variant, state) if tracker_from else None
  extra = {TEXT_PROJECTION: _text_projection(config, original, report)}
  rope = rope_freqs_cis(config)
  if safetensors:
    report.left_out["RoPE tables (freqs_cis): safetensors holds no complex tensors; Meta's ViT "
                    "computes them when built"] = len(rope)
  else:
    extra.update(rope)
    report.written["RoPE tables (freqs_cis), computed as Meta's ViT does"] = len(rope)
  tensors = {f"detector.{k}": v for k, v in {**state, **extra}.items()}
  if original is None:
    report.notes.append("no video tracker and no tracker neck copies ("
                        + ", ".join(NECK_COPIES[config.variant]) + "): the image model has "
                        "none; --tracker-from ORIGINAL.pt copies them for Meta's video predictor")
    return tensors
  necks = tuple(f"{_NECK}{branch}." for branch in NECK_COPIES[config.variant])
  copied = original.keys(("tracker.",) + necks)
  for key in copied:
    tensors[key if key.startswith("tracker.") else f"detector.{key}"] = original.store.raw(key)
  report.written[f"video tracker and the tracker's neck copies, from {tracker_from}"] = len(copied)
  return tensors


def _sam3i_tensors(config: Sam3Config, state: dict, *, report: ExportReport) -> dict:
  if not config.adapters:
    raise ConversionError("the model has no SAM3-I adapters (a SAM 3 model): export it with "
                          "--format sam3")
  tensors = {**state, TEXT_PROJECTION: _text_projection(config, None, report)}
  tensors.update(rope_freqs_cis(config))
  report.written["RoPE tables (freqs_cis), computed as Meta's ViT does"] = config.vit_depth
  dead = {_DEAD_TEXT + k[len(_LIVE_TEXT):]: v for k, v in tensors.items() if k.startswith(_LIVE_TEXT)}
  tensors.update(dead)
  report.written["dead duplicate text encoder (backbone.text.*): a copy of the live one, which "
                 "SAM3-I's model registers but never runs"] = len(dead)
  heads = {prefix + k[len(_HEAD):]: v for k, v in state.items() if k.startswith(_HEAD)
           for prefix in _HEAD_COPIES}
  tensors.update(heads)
  report.written["the shared projection head under its other names (complex_query_proj, "
                 "concept_proj)"] = len(heads)
  return tensors


def _as_torch(array, dtype):
  """One tensor, contiguous and cast (float tensors only); a contiguous array is not copied."""
  import torch

  tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
  if tensor.is_floating_point() and tensor.dtype != dtype:
    tensor = tensor.to(dtype)
  return tensor.contiguous()


def _write(tensors: dict, path: str, *, dtype: str, safetensors: bool, log) -> tuple[int, int]:
  """Casts the tensors one by one (each float32 source dropped once cast) and writes them;
  returns (tensors, bytes)."""
  import torch

  target = getattr(torch, dtype)
  out, total, step = {}, len(tensors), max(1, len(tensors) // 4)
  for i, key in enumerate(list(tensors)):
    out[key] = _as_torch(tensors.pop(key), target)
    if (i + 1) % step == 0 and i + 1 < total:
      log(f"  {i + 1}/{total} tensors in the PyTorch layout")
  size = sum(t.numel() * t.element_size() for t in out.values())
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if safetensors:
    from safetensors.torch import save_file
    save_file(out, path, metadata={"format": "pt"})  # transformers checks the format
  else:
    torch.save({"model": out}, path)
  return len(out), size


def export(model_dir: str, fmt: str, output: str, *, dtype: str = "float32",
           safetensors: bool = False, tracker_from: str | None = None,
           drop_adapters: bool = False, log=print) -> ExportReport:
  """Writes the model of `model_dir` (a converted or trained directory) to `output` in `fmt`
  (FORMATS). Raises ConversionError for what the format cannot hold, FileExistsError if `output`
  exists. See the module docstring for what each format gets besides the parameters."""
  from sam3i_jax.pretrained import load_pretrained

  if fmt not in FORMATS:
    raise ConversionError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
  if dtype not in DTYPES:
    raise ConversionError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
  if os.path.exists(output):
    raise FileExistsError(f"{output} exists; choose a new path")
  if safetensors and fmt == "sam3i":
    raise ConversionError("the sam3i layout is a torch.save checkpoint; --safetensors applies to "
                          "--format sam3 (hf-sam3 is always safetensors)")
  if tracker_from and fmt != "sam3":
    raise ConversionError("--tracker-from applies to --format sam3 (the tracker lives in sam3.pt)")
  start = time.time()
  model = load_pretrained(model_dir)
  config = model.config
  state = torch_state_dict(model, release=True)  # the model's buffers are freed as they are copied
  del model
  log(f"{model_dir}: a {config.variant} model{' with SAM3-I adapters' if config.adapters else ''}, "
      f"{len(state)} parameter tensors ({sum(v.size for v in state.values()) / 1e6:.1f}M values)")
  report = ExportReport(output, fmt)
  path = output
  if fmt == "hf-sam3":
    from convert.hf_sam3 import export_hf_sam3
    state = _without_additions(state, drop_adapters, fmt, report)
    tensors = export_hf_sam3(config, state, output, dtype=dtype, report=report)
    path, safetensors = os.path.join(output, "model.safetensors"), True
  elif fmt == "sam3":
    tensors = _sam3_tensors(config, state, safetensors=safetensors, drop_adapters=drop_adapters,
                            tracker_from=tracker_from, report=report)
  else:
    tensors = _sam3i_tensors(config, state, report=report)
  del state
  report.tensors, report.bytes = _write(tensors, path, dtype=dtype, safetensors=safetensors, log=log)
  log(report.summary())
  log(f"done in {time.time() - start:.1f}s")
  return report

