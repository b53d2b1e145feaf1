"""Helpers for parity tests against Meta's PyTorch SAM 3 (PyPI sam3==0.1.4, random weights).

Import this module before torchvision/timm/sam3: it imports sam3_cpu, which applies the CPU
workarounds described in ../shared/reference/sam3_cpu/README.md.
"""

from __future__ import annotations

import functools

import numpy as np
import sam3_cpu  # noqa: F401  (must precede torch users)
import torch

from convert.torch_layout import load_state_dict
from sam3i_jax.models.config import Sam3Config, get_preset

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


def load_into(module, state_dict: dict, prefix: str) -> None:
  """Loads the PyTorch tensors under `prefix` into the Flax `module` (strict)."""
  sub = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k.endswith("freqs_cis")}
  load_state_dict(module, sub, prefix=prefix)


def rel_l2(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(ours, ref, tol: float = TOL_SMALL, name: str = "output") -> None:
  err = rel_l2(ours, ref)
  assert np.isfinite(np.asarray(ours)).all(), f"{name}: non-finite values"
  assert err <= tol, f"{name}: relative L2 error {err:.3g} > {tol:g}"


def to_numpy(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy()
