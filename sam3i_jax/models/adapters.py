"""SAM3-I's cascaded instruction adapters (text_encoder_ve_ada.py, encoder.py, decoder.py and
maskformer_segmentation.py of github.com/debby-0527/SAM3-I), the stage-3 projection head and the
stage migrations.

Every adapted layer owns three adapters: `adapter1` (the S-adapter, simple level), and the complex
level's cascade `adapter12` (starts as a copy of the trained adapter1) followed by `adapter2` (the
C-adapter). `adapter_path` is the one place that composes them.

Initialisation differs from the released code on purpose (see docs/design.md §4): there, the
text and fusion-encoder adapters zero their input projections too, which leaves only the output
biases trainable. Here the input projections (down_proj, the adapter MHA's in_proj) keep Flax's
LeCun initialisation and only the output projections (up_proj, the MHA's out_proj) start at zero,
so an untrained adapter is the identity and every parameter can learn.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sam3i_jax.models.config import Sam3Config
from sam3i_jax.models.layers import MultiHeadAttention, dense, gelu, layer_norm
from sam3i_jax.models.levels import Level

PathParts = tuple


@dataclasses.dataclass(frozen=True)
class Addition:
  """One group of SAM3-I's additions to SAM 3."""
  pattern: str  # over dotted parameter paths; PyTorch keys match too (same prefixes)
  initial: str  # what the group is when the adapters are added to a SAM 3 model


# Every parameter SAM3-I adds to SAM 3, by group; the curriculum trains them by these names, the
# converters initialise absent groups by them.
ADDITIONS: dict[str, Addition] = {
    "simple adapters": Addition(r"(^|\.)adapter1\.", "identity: zero output projections"),
    "complex adapters": Addition(r"(^|\.)adapter(12|2)\.", "identity: zero output projections"),
    "simple mask predictor": Addition(r"^segmentation_head\.mask_predictor_adapter1\.",
                                      "copy of mask_predictor"),
    "complex mask predictor": Addition(r"^segmentation_head\.mask_predictor_adapter2\.",
                                       "copy of mask_predictor"),
    "projection head": Addition(r"^simple_query_proj\.", "random"),
}
MASK_PREDICTOR_COPIES = {"simple mask predictor": "mask_predictor_adapter1",
                         "complex mask predictor": "mask_predictor_adapter2"}


def addition_of(path: str) -> str | None:
  """The group (a key of ADDITIONS) of a dotted parameter path; None for SAM 3's own."""
  return next((name for name, group in ADDITIONS.items() if re.search(group.pattern, path)), None)


def _zero(linear: nnx.Linear) -> nnx.Linear:
  linear.kernel.set_value(jnp.zeros_like(linear.kernel[...]))
  linear.bias.set_value(jnp.zeros_like(linear.bias[...]))
  return linear


class TextAdapter(nnx.Module):
  """The text encoder's MultiHeadMLPAdapter: `h = x + MHA(norm1(x))` with no attention mask (all
  positions, padding included), then `h + up_proj(gelu(down_proj(norm2(h))))`.

  It returns the whole stream (its identity path is inside), as the reference's does.
  """

  def __init__(self, config: Sam3Config, *, rngs: nnx.Rngs):
    width, dtype = config.text_width, config.compute_dtype
    self.mha_adapter = MultiHeadAttention(width, config.text_adapter_heads, rngs=rngs, dtype=dtype,
                                          dropout=config.text_adapter_dropout)
    _zero(self.mha_adapter.out_proj)
    self.down_proj = dense(width, config.text_adapter_bottleneck, rngs=rngs, dtype=dtype)
    self.up_proj = _zero(dense(config.text_adapter_bottleneck, width, rngs=rngs, dtype=dtype))
    self.norm1 = layer_norm(width, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(width, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = self.norm1(x)
    x = x + self.mha_adapter(t, t, t)
    return x + self.up_proj(gelu(self.down_proj(self.norm2(x))))


class BottleneckAdapter(nnx.Module):
  """The fusion encoder's and decoder's adapter: `up_proj(gelu(norm(down_proj(x))))`, LayerNorm on
  the bottleneck. No skip: the layers add the residual (the reference's class is called
  MultiHeadMLPAdapter but has no attention)."""

  def __init__(self, dim: int, bottleneck: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.down_proj = dense(dim, bottleneck, rngs=rngs, dtype=dtype)
    self.up_proj = _zero(dense(bottleneck, dim, rngs=rngs, dtype=dtype))
    self.norm = layer_norm(bottleneck, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.up_proj(gelu(self.norm(self.down_proj(x))))


def adapter_path(level: Level, x: jax.Array, owner: nnx.Module, *, second_skip: bool = False
                 ) -> jax.Array:
  """The adapters of `owner` (a layer with adapter1, adapter12, adapter2) applied to x.

  simple: adapter1(x); complex: adapter2(adapter12(x)), plus adapter12(x) when `second_skip` (the
  fusion encoder builds its adapter2 with skip_connect=True, the decoder without). Never called for
  the concept level, which runs no adapter at all.
  """
  if level is Level.SIMPLE:
    return owner.adapter1(x)
  if level is not Level.COMPLEX:
    raise ValueError(f"no adapter path for level {level!r}")
  first = owner.adapter12(x)
  second = owner.adapter2(first)
  return first + second if second_skip else second


class ProjectionHead(nnx.List):
  """The stage-3 projection MLP, `nn.Sequential(Linear, LayerNorm, ReLU, Linear)`. An nnx.List so
  that parameter paths keep the Sequential's indices 0, 1 and 3 (slot 2, the ReLU, is empty)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    super().__init__([dense(dim, dim, rngs=rngs, dtype=dtype), layer_norm(dim, rngs=rngs, dtype=dtype),
                      None, dense(dim, dim, rngs=rngs, dtype=dtype)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self[3](jax.nn.relu(self[1](self[0](x))))


# --- migrations between curriculum stages (functions on nnx.State) ------------------------------
_ZERO = object()


def _rewrite(state: nnx.State, source_of: Callable[[PathParts], PathParts | object | None],
             what: str) -> nnx.State:
  """A new state in which each variable whose path `source_of` maps to another path takes that
  variable's value (_ZERO: zeros); all others are copied unchanged."""
  flat = dict(nnx.to_flat_state(state))
  rewritten, changed = [], 0
  for path, variable in flat.items():
    source = source_of(path)
    if source is None:
      value = variable[...]
    elif source is _ZERO:
      value, changed = jnp.zeros_like(variable[...]), changed + 1
    elif source in flat:
      value, changed = flat[source][...], changed + 1
    else:
      raise ValueError(f"{what}: {'.'.join(map(str, path))} has no source "
                       f"{'.'.join(map(str, source))} in the given state")
    rewritten.append((path, variable.replace(value)))
  if not changed:
    raise ValueError(f"{what}: the state holds none of the SAM3-I adapter parameters")
  return nnx.from_flat_state(rewritten)


def _renamed(path: PathParts, old: str, new: str) -> PathParts:
  return tuple(new if part == old else part for part in path)


def copy_mask_predictor(state: nnx.State) -> nnx.State:
  """mask_predictor_adapter1 and _adapter2 := mask_predictor, as the reference does whenever it
  adds the adapters to a SAM 3 model (model_builder._sync_segmentation_head_adapters)."""
  def source_of(path):
    copy = MASK_PREDICTOR_COPIES.get(addition_of(".".join(map(str, path))))
    return None if copy is None else _renamed(path, copy, "mask_predictor")
  return _rewrite(state, source_of, "copy_mask_predictor")


def migrate_to_complex(state: nnx.State) -> nnx.State:
  """The start of stage 2, from a stage-1 state: in every adapted layer adapter12 := adapter1 and
  adapter2's output projections (up_proj, mha_adapter.out_proj) := 0; mask_predictor_adapter2 :=
  mask_predictor_adapter1. adapter2's other parameters keep their values: the reference zeroes
  them all (LayerNorm scales included), which leaves its C-adapters bias-only
  (docs/design.md §4).

  The complex path then computes the simple path's function in the text and fusion encoders; in
  the decoder, whose adapter2 has no skip, it starts as SAM 3's."""
  def source_of(path):
    if "adapter12" in path:
      return _renamed(path, "adapter12", "adapter1")
    if "mask_predictor_adapter2" in path:
      return _renamed(path, "mask_predictor_adapter2", "mask_predictor_adapter1")
    if "adapter2" in path and ("up_proj" in path or "out_proj" in path):
      return _ZERO
    return None
  return _rewrite(state, source_of, "migrate_to_complex")
