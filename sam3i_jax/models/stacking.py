"""Repeated layers with stacked parameters, run by `jax.lax.scan` (MaxText's scan_layers).

A stack of n layers is one module of the layer's class whose every variable (parameters, dropout
RNG keys and counters) carries a leading axis of size n. The step program then holds one traced
copy of the layer instead of n, which is what keeps the full-size training step's compile time
and host memory bounded (32 ViT blocks, 24 text blocks per text encoding, 6 + 6 fusion-encoder
and decoder layers per branch).

Parameter paths drop the layer index: `...transformer.resblocks.attn.in_proj.kernel` has shape
(24, 1024, 3072) where Meta's checkpoint has `...transformer.resblocks.{0..23}.attn.in_proj_weight`.
The converter (convert/torch_layout.py) and `restack` (layouts written before layers were
stacked) map per-layer tensors onto stacks; `STACKED_LAYERS` names every stack for the sharding
rules, which give the leading axis the logical name "layers".
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sam3i_jax.models.layers import REMAT_POLICIES
from sam3i_jax.tree_paths import dotted

# Dotted path prefixes of the model's stacks (regexes on a path that ends before the layer's own
# names). tests/test_stacking.py checks this table against the stacks a model actually has.
STACKED_LAYERS: tuple[str, ...] = (
    r"backbone\.vision_backbone\.trunk\.blocks",
    r"backbone\.language_backbone\.encoder\.transformer\.resblocks",
    r"transformer\.encoder\.layers",
    r"transformer\.decoder\.layers",
)
_STACKED = re.compile(r"(^|\.)(" + "|".join(STACKED_LAYERS) + r")\.")

STACK_SIZE = "stack_size"  # the attribute that marks a stacked module and holds n


def is_stacked_path(path: str) -> bool:
  """Whether the dotted path of a state leaf lies inside a stack (its leading axis is the layer)."""
  return _STACKED.search(path) is not None


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
  """One module holding `layers` (built one by one, so initialisation consumes the RNG streams
  exactly as unstacked layers would) with every variable stacked on a new leading axis."""
  graphdef, first = nnx.split(layers[0])
  states = [first] + [nnx.state(layer) for layer in layers[1:]]
  for i, layer in enumerate(layers[1:], 1):
    if nnx.graphdef(layer) != graphdef:
      raise ValueError(f"layer {i} differs in structure or static attributes from layer 0")
  stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
  setattr(stacked, STACK_SIZE, len(layers))
  return stacked


def stack_size(module: nnx.Module) -> int | None:
  return getattr(module, STACK_SIZE, None)


def layer_at(stacked: nnx.Module, index: int) -> nnx.Module:
  """Layer `index` of a stack as a module of its own (a copy of its slice of every variable)."""
  def one(x):  # an abstract stack (nnx.eval_shape) gives an abstract layer
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[index]

  graphdef, state = nnx.split(stacked)
  layer = nnx.merge(graphdef, jax.tree.map(one, state))
  delattr(layer, STACK_SIZE)
  return layer


def scan_layers(stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
                carry: Any, xs: Any = None, *, remat: str = "none") -> tuple[Any, Any]:
  """Runs `carry, y = body(layer, carry, x)` over the layers of a stack in order, x and y being
  the per-layer slices of `xs` and of the stacked result; rematerialises each layer in the
  backward pass under the named policy (layers.REMAT_POLICIES). Non-parameter variables that the
  layers update (dropout RNG counters) are written back to the stack."""
  graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)
  rest_leaves, rest_def = jax.tree.flatten(rest)
  mutated = []  # per non-parameter leaf: did the layer replace it? (seen while tracing `step`)

  def step(carry, inputs):
    layer_params, layer_rest, x = inputs
    layer = nnx.merge(graphdef, layer_params, jax.tree.unflatten(rest_def, layer_rest))
    carry, y = body(layer, carry, x)
    new_rest = jax.tree.leaves(nnx.state(layer, nnx.Not(nnx.Param)))
    mutated[:] = [new is not old for new, old in zip(new_rest, layer_rest)]
    return carry, (new_rest, y)

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  carry, (rest_leaves, ys) = jax.lax.scan(step, carry, (params, rest_leaves, xs))
  # Written back only when a layer advanced an RNG counter (active dropout): a stack whose state
  # a jitted function closed over (rather than took as an argument) still runs in eval mode.
  if any(mutated):
    nnx.update(stacked, jax.tree.unflatten(rest_def, rest_leaves))
  return carry, ys


def stacked_prefixes(model: nnx.Module) -> dict[tuple, int]:
  """{module path: n} of every stack in `model`."""
  return {tuple(path): stack_size(module) for path, module in model.iter_modules()
          if stack_size(module) is not None}


def restack(source: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
  """Arrays for every leaf of `target` ({dotted path: array or ShapeDtypeStruct}) from `source`
  ({dotted path: array}, e.g. a state written before layers were stacked): a path present in
  `source` is taken as is; a stacked leaf `P.rest` of leading size n is stacked from the n
  per-layer leaves `P.0.rest` ... `P.{n-1}.rest`. Raises ValueError naming every leaf it cannot
  find or whose shape differs, and every source leaf left unused."""
  out, used, problems = {}, set(), []
  for path, leaf in target.items():
    shape = tuple(np.shape(leaf))
    if path in source:
      candidates = [[path]]
    else:
      parts = path.split(".")
      n = shape[0] if shape else 0
      candidates = [[".".join(parts[:j] + [str(i)] + parts[j:]) for i in range(n)]
                    for j in range(1, len(parts))]
      candidates = [keys for keys in candidates if keys and all(k in source for k in keys)]
    if not candidates:
      problems.append(f"missing: {path} {shape}")
      continue
    keys = candidates[0]
    values = [source[k] for k in keys]
    # jnp for JAX arrays (typed PRNG keys among them), numpy for host arrays.
    stack = jnp.stack if any(isinstance(v, jax.Array) for v in values) else np.stack
    value = values[0] if keys == [path] else stack(values)
    if tuple(np.shape(value)) != shape:
      problems.append(f"shape: {path} {tuple(np.shape(value))} -> expected {shape}")
      continue
    out[path] = value
    used.update(keys)
  problems += [f"unexpected: {k}" for k in sorted(set(source) - used)]
  if problems:
    raise ValueError("cannot restack the state:\n  " + "\n  ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  return out


def flat_leaves(tree: Any) -> dict[str, Any]:
  """{dotted path: leaf} in tree order. orbax spells an nnx Variable's array as a `value` entry,
  which the in-memory state has as an attribute: dropped, so both spell a leaf alike."""
  return {dotted(path).removesuffix(".value"): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restack_tree(source: Any, target: Any) -> Any:
  """`source` (a restored tree, stacked or per-layer) as a tree like `target` (ShapeDtypeStructs
  with shardings): `restack` by dotted path, each leaf placed on its target sharding."""
  flat_target = flat_leaves(target)
  arrays = restack(flat_leaves(source), flat_target)
  leaves = [jax.device_put(arrays[path], leaf.sharding) for path, leaf in flat_target.items()]
  return jax.tree.unflatten(jax.tree.structure(target), leaves)
