"""PyTorch state-dict layout <-> Flax NNX state, by the naming rule of sam3i_jax.models.layers.

The Flax module tree mirrors Meta's module names, so every Flax parameter has exactly one
PyTorch key, found from its path and the type of the module that owns it:

  nnx.Linear      kernel (in, out)        <- weight (out, in), transposed
  nnx.Conv        kernel (kh, kw, I, O)   <- weight (O, I, kh, kw)
  nnx.LayerNorm / nnx.GroupNorm scale     <- weight
  nnx.Embed       embedding               <- weight
  `X.in_proj` (fused MHA projection) kernel/bias <- `X.in_proj_weight` / `X.in_proj_bias`
  anything else (raw nnx.Param)           <- the same name, unchanged
  a stacked (scanned) layer's parameter P.rest (n, ...) <- P.0.rest ... P.{n-1}.rest, stacked

`load_state_dict` applies the rule one way (import), `torch_state_dict` the other (export).
Nothing here imports torch: state dicts arrive and leave as {key: numpy array}.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.models.stacking import stacked_prefixes

Transform = Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _linear_kernel(a: np.ndarray) -> np.ndarray:
  return a.T


def _conv_kernel(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)


def _conv_weight(a: np.ndarray) -> np.ndarray:
  return a.transpose(3, 2, 0, 1)


# Each import transform's inverse (a Flax array -> the PyTorch tensor's layout).
_TO_TORCH: dict[Transform, Transform] = {
    _identity: _identity, _linear_kernel: _linear_kernel, _conv_kernel: _conv_weight}


_LEAF_RULES: dict[type, dict[str, tuple[str, Transform]]] = {
    nnx.Linear: {"kernel": ("weight", _linear_kernel), "bias": ("bias", _identity)},
    nnx.Conv: {"kernel": ("weight", _conv_kernel), "bias": ("bias", _identity)},
    nnx.LayerNorm: {"scale": ("weight", _identity), "bias": ("bias", _identity)},
    nnx.GroupNorm: {"scale": ("weight", _identity), "bias": ("bias", _identity)},
    nnx.Embed: {"embedding": ("weight", _identity)},
}


def _key(parts: Iterable) -> str:
  return ".".join(str(p) for p in parts)


def torch_key(module_path: tuple, module: nnx.Module, leaf: str) -> tuple[str, Transform]:
  """The PyTorch key and the array transform for leaf `leaf` of `module` at `module_path`."""
  for cls, rules in _LEAF_RULES.items():
    if isinstance(module, cls) and leaf in rules:
      name, transform = rules[leaf]
      if module_path and module_path[-1] == "in_proj":  # torch MHA keeps its fused projection raw
        return _key(module_path[:-1] + (f"in_proj_{name}",)), transform
      return _key(module_path + (name,)), transform
  return _key(module_path + (leaf,)), _identity


class TableEntry(NamedTuple):
  path: tuple  # the nnx path of the parameter
  param: nnx.Param
  transform: Transform
  layer: int | None  # for a stacked (scanned) parameter: the layer this key fills

  def to_torch(self) -> np.ndarray:
    """This key's tensor in PyTorch's layout: a new C-contiguous array."""
    array = np.asarray(self.param[...])
    return np.array(_TO_TORCH[self.transform](array if self.layer is None else array[self.layer]),
                    order="C")


def param_table(model: nnx.Module) -> dict[str, TableEntry]:
  """{torch key: TableEntry} for every parameter of `model`. A parameter of a stack of n layers
  (sam3i_jax.models.stacking) has n keys, `P.0.rest` ... `P.{n-1}.rest`, one per layer."""
  stacks = stacked_prefixes(model)
  table = {}
  for path, module in model.iter_modules():
    path = tuple(path)
    stack = next(((len(prefix), n) for prefix, n in stacks.items()
                  if path[:len(prefix)] == prefix), None)
    for name, value in vars(module).items():
      if not isinstance(value, nnx.Param):
        continue
      layers = [(None, path)] if stack is None else [
          (i, path[:stack[0]] + (i,) + path[stack[0]:]) for i in range(stack[1])]
      for layer, torch_path in layers:
        key, transform = torch_key(torch_path, module, name)
        if key in table:
          raise AssertionError(f"two Flax parameters map to the PyTorch key {key}")
        table[key] = TableEntry(path + (name,), value, transform, layer)
  return table


def torch_state_dict(model: nnx.Module, *, release: bool = False) -> dict[str, np.ndarray]:
  """`model`'s parameters as a PyTorch state dict {key: new array}, the inverse of
  load_state_dict: stacked layers unstacked, kernels in PyTorch's layout, in the parameters' dtype.

  release: free each parameter's buffer as soon as its tensors are copied out, so that the peak
  stays near one model's size (the model is unusable afterwards)."""
  state = {}
  by_param: dict[int, list[tuple[str, TableEntry]]] = {}
  for key, entry in param_table(model).items():
    by_param.setdefault(id(entry.param), []).append((key, entry))
  for entries in by_param.values():
    for key, entry in entries:
      state[key] = entry.to_torch()
    if release:
      entries[0][1].param[...].delete()
  return state


@dataclasses.dataclass
class LoadReport:
  """What a state-dict load used, ignored, lacked or could not fit."""
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)  # Flax params with no tensor
  unexpected: list[str] = dataclasses.field(default_factory=list)  # tensors with no Flax param
  mismatched: list[str] = dataclasses.field(default_factory=list)  # "key: torch shape -> flax shape"
  ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> keys
  fresh: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> params left to the caller

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def summary(self, limit: int = 20) -> str:
    lines = [f"loaded {len(self.loaded)} tensors"]
    for reason, keys in self.ignored.items():
      lines.append(f"ignored {len(keys)} tensors ({reason})")
    for reason, keys in self.fresh.items():
      lines.append(f"not in the checkpoint, initialised fresh: {len(keys)} parameters ({reason})")
    for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                        ("shape mismatch", self.mismatched)):
      if keys:
        shown = "\n    ".join(keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        lines.append(f"{title}: {len(keys)}\n    {shown}{more}")
    return "\n".join(lines)


class ConversionError(ValueError):
  pass


def load_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray], *, prefix: str = "",
                    ignore: dict[str, Callable[[str], bool]] | None = None,
                    fresh: dict[str, Callable[[str], bool]] | None = None,
                    strict: bool = True) -> LoadReport:
  """Fills `model`'s parameters in place from `state_dict` (keys under `prefix`).

  ignore: {reason: predicate(full key)} for tensors knowingly left out (reported, not silent).
  fresh: {reason: predicate(full key)} for parameters the checkpoint may lack; those it lacks are
    listed in `report.fresh` instead of `missing`, for the caller to initialise.
  strict: raise ConversionError listing missing, unexpected and mis-shaped tensors.
  Tensors are consumed from `state_dict` as they are copied or ignored, so the caller's dict
  shrinks and a full-size conversion never holds two copies of the weights (nor, for a SAM3-I
  checkpoint, its dead duplicate text encoder longer than needed).
  """
  ignore = ignore or {}
  report = LoadReport()
  table = param_table(model)
  stacks: dict[int, np.ndarray] = {}  # id(param) -> the stacked array being filled layer by layer
  filled: dict[int, int] = {}
  for key in [k for k in state_dict if k.startswith(prefix)]:
    local = key[len(prefix):]
    reason = next((r for r, pred in ignore.items() if pred(key)), None)
    if reason is not None:
      report.ignored.setdefault(reason, []).append(key)
      del state_dict[key]
      continue
    if local not in table:
      report.unexpected.append(key)
      continue
    entry = table.pop(local)
    array = entry.transform(np.asarray(state_dict[key]))
    shape = tuple(entry.param.shape)[0 if entry.layer is None else 1:]
    if tuple(array.shape) != shape:
      report.mismatched.append(f"{key}: {tuple(np.shape(state_dict[key]))} -> expected {shape} "
                               f"(as {entry.path}{'' if entry.layer is None else f'[{entry.layer}]'})")
      continue
    if entry.layer is None:
      entry.param.set_value(jnp.asarray(array, dtype=entry.param.dtype))
    else:
      stack = stacks.setdefault(id(entry.param), np.empty(entry.param.shape, entry.param.dtype))
      stack[entry.layer] = array
      filled[id(entry.param)] = filled.get(id(entry.param), 0) + 1
      if filled[id(entry.param)] == entry.param.shape[0]:  # every layer is in: set the stack once
        entry.param.set_value(jnp.asarray(stacks.pop(id(entry.param))))
    del state_dict[key]
    report.loaded.append(key)
  for key in sorted(prefix + k for k in table):
    reason = next((r for r, pred in (fresh or {}).items() if pred(key)), None)
    if reason is None:
      report.missing.append(key)
    else:
      report.fresh.setdefault(reason, []).append(key)
  if strict and not report.ok:
    raise ConversionError("checkpoint does not fit the model:\n" + report.summary())
  return report
