"""Helpers for parity tests against Meta's PyTorch SAM 3 (PyPI sam3==0.1.4, random weights).

Import this module before torchvision/timm/sam3: it imports sam3_cpu, which applies the CPU
workarounds described in docs/design.md §9.
"""

from __future__ import annotations

import functools
import os

import jax

import numpy as np
import sam3_cpu  # noqa: F401  (must precede torch users)
import torch
from flax import nnx

from convert.sam3 import IGNORED_GROUPS
from convert.torch_layout import load_state_dict
from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.models.config import Sam3Config, get_preset
from xla_cpu import FAST_COMPILE  # noqa: F401  (tests use parity.FAST_COMPILE)

# Relative L2 tolerances at float32 with highest matmul precision (issue #2).
TOL_SMALL = 1e-5
TOL_FULL = 1e-4

torch.set_num_threads(1)  # bits depend on the thread count; pytest-xdist runs 2 workers


def reference_sizes(config: Sam3Config) -> dict:
  """The sam3_cpu build arguments that give the PyTorch model of `config`'s sizes."""
  return {k: getattr(config, k) for k in sam3_cpu.FULL_CONFIG}


@functools.lru_cache(maxsize=4)
def reference_model(preset: str, seed: int = 0, perturb: float = 0.02):
  """(config, torch model, numpy state dict) for a small preset; cached per test process."""
  config = get_preset(preset)
  model = sam3_cpu.build_tiny(seed=seed, perturb=perturb, **reference_sizes(config))
  return config, model, sam3_cpu.state_dict_numpy(model)


def converted_checkpoint(preset: str, directory: str) -> str:
  """Writes the reference model of `preset` as a released-layout sam3.pt into `directory`, converts
  it with the real converter and returns the converted directory."""
  from convert.sam3 import convert_sam3
  from full_size_reference import released_layout

  config, model, _ = reference_model(preset)
  path = os.path.join(directory, "sam3.pt")
  torch.save(released_layout(model), path)
  out = os.path.join(directory, "converted")
  convert_sam3(path, out, base=config, log=lambda *_: None)
  return out


def load_into(module, state_dict: dict, prefix: str) -> None:
  """Loads the PyTorch tensors under `prefix` into the Flax `module` (strict), skipping the
  groups the converter knowingly ignores (freqs_cis, text_projection, ...)."""
  sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  load_state_dict(module, sub, prefix=prefix, ignore=IGNORED_GROUPS)


def build(make, state_dict: dict, prefix: str):
  """An abstract (nnx.eval_shape) module filled from the reference state dict: no random init."""
  module = nnx.eval_shape(make)
  load_into(module, state_dict, prefix)
  return module


def fast_jit(fn, module):
  """jit(fn)(module, *args) with the module's parameters as arguments, compiled with FAST_COMPILE.

  Returns a function of the remaining arguments. Other state (abstract dropout RNG streams of an
  eval_shape-built module) is closed over; it is never read in eval mode or at dropout rate 0.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  jitted = jax.jit(lambda p, *args: fn(nnx.merge(graphdef, p, rest), *args), compiler_options=FAST_COMPILE)
  return lambda *args: jitted(params, *args)


def rel_l2(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(ours, ref, tol: float = TOL_SMALL, name: str = "output") -> None:
  err = rel_l2(ours, ref)
  assert np.isfinite(np.asarray(ours)).all(), f"{name}: non-finite values"
  assert err <= tol, f"{name}: relative L2 error {err:.3g} > {tol:g}"


def seq_first(x: np.ndarray) -> torch.Tensor:
  """A batch-first array as the sequence-first tensor Meta's modules take."""
  return torch.from_numpy(np.ascontiguousarray(x)).transpose(0, 1)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy()


COMPARED = {  # our output name -> reference name
    "pred_logits": "pred_logits", "pred_boxes": "pred_boxes", "pred_boxes_xyxy": "pred_boxes_xyxy",
    "pred_masks": "pred_masks", "semantic_seg": "semantic_seg", "presence_logit": "presence_logit_dec",
    "queries": "queries"}


def assert_outputs_match(ours: dict, ref: dict, tol: float) -> None:
  for name, ref_name in COMPARED.items():
    assert_close(ours[name], ref[ref_name], tol, name)


def assert_same_kept_sets(ours: dict, ref: dict, presence_in_logits: bool = False) -> None:
  """Post-processing keeps the same queries and masks at the default threshold and at the
  reference's median score (random weights rarely pass 0.5, so the second makes the check bite).
  presence_in_logits: SAM 3.1's scoring, whose reference score is sigmoid(pred_logits) alone."""
  ref_scores = 1 / (1 + np.exp(-ref["pred_logits"][0, :, 0]))
  if not presence_in_logits:
    ref_scores = ref_scores / (1 + np.exp(-ref["presence_logit_dec"][0, 0]))
  for threshold in (0.5, float(np.median(ref_scores))):
    kept = [postprocess(o["pred_logits"][0], o["pred_boxes"][0], o["pred_masks"][0], o[p][0], (97, 131),
                        threshold=threshold, presence_in_logits=presence_in_logits)
            for o, p in ((jax.device_get(ours), "presence_logit"), (ref, "presence_logit_dec"))]
    np.testing.assert_array_equal(kept[0]["query_index"], kept[1]["query_index"])
    np.testing.assert_allclose(kept[0]["scores"], kept[1]["scores"], rtol=1e-5)
    differing = np.mean(kept[0]["masks"] != kept[1]["masks"]) if len(kept[0]["masks"]) else 0.0
    assert differing < 1e-4, f"{differing:.2%} of kept-mask pixels differ"
  assert len(kept[1]["query_index"]) > 0, "the median threshold must keep some queries"
