"""Which parameters train in each stage of SAM3-I's curriculum, and their learning-rate groups.

The rules are data: regular expressions over dotted parameter paths (the PyTorch state-dict keys
up to the leaf name and the index of a stacked layer, e.g.
`transformer.decoder.layers.adapter12.up_proj.kernel`), first match wins, as in big_vision.

  stage 0  every SAM 3 parameter: the demo's from-scratch training on concept prompts (the released
           recipe starts from sam3.pt instead); SAM3-I's additions stay frozen
  stage 1  the simple path: adapter1 everywhere + mask_predictor_adapter1
  stage 2  the complex path: adapter12 + adapter2 everywhere + mask_predictor_adapter2
  stage 3  both paths + the projection head

The reference marks every parameter whose name contains "adapter" trainable in every stage
(model_builder._freeze_non_adapter_params), but a stage's loss reaches only its level's path: the
others get no gradient, and torch's AdamW skips them (grad None), so they do not move. Here they are
frozen explicitly, which is the same training; with optax they would otherwise decay.

LR groups (base.yaml): parameters under `backbone.language_backbone` (the text-encoder adapters) vs
everything else. `lr_group` plugs into sam3i_jax.train.optimizer.make_optimizer as `group_of`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from sam3i_jax.tree_paths import dotted

FROZEN = "frozen"
DEFAULT = "default"
TEXT_ADAPTERS = "text_adapters"
STAGES = (0, 1, 2, 3)

# SAM3-I's additions to SAM 3, by parameter path. They match PyTorch keys as well (same prefixes).
ADDITIONS: dict[str, str] = {
    "simple adapters": r"(^|\.)adapter1\.",
    "complex adapters": r"(^|\.)adapter(12|2)\.",
    "simple mask predictor": r"^segmentation_head\.mask_predictor_adapter1\.",
    "complex mask predictor": r"^segmentation_head\.mask_predictor_adapter2\.",
    "projection head": r"^simple_query_proj\.",
}

STAGE_ADDITIONS: dict[int, tuple[str, ...]] = {
    1: ("simple adapters", "simple mask predictor"),
    2: ("complex adapters", "complex mask predictor"),
    3: tuple(ADDITIONS),
}

# (pattern, trainable) per stage, first match wins.
TRAINABLE_RULES: dict[int, tuple[tuple[str, bool], ...]] = {
    0: tuple((pattern, False) for pattern in ADDITIONS.values()) + ((r".*", True),),
    **{stage: tuple((ADDITIONS[name], True) for name in names) + ((r".*", False),)
       for stage, names in STAGE_ADDITIONS.items()},
}

LR_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.language_backbone\.", TEXT_ADAPTERS),
    (r".*", DEFAULT),
)


def _first_match(rules, path: str):
  return next(value for pattern, value in rules if re.search(pattern, path))


def _check_stage(stage: int) -> int:
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  return stage


def addition_of(path: str) -> str | None:
  """The SAM3-I group (a key of ADDITIONS) that a dotted path belongs to; None for SAM 3's own."""
  return next((name for name, pattern in ADDITIONS.items() if re.search(pattern, path)), None)


def is_trainable(path: str, stage: int) -> bool:
  return _first_match(TRAINABLE_RULES[_check_stage(stage)], path)


def lr_group(path: str) -> str:
  """TEXT_ADAPTERS or DEFAULT for a dotted parameter path."""
  return _first_match(LR_GROUP_RULES, path)


def label(path: str, stage: int) -> str:
  """FROZEN, or the LR group of a trainable parameter."""
  return lr_group(path) if is_trainable(path, stage) else FROZEN


def trainable(stage: int) -> nnx.filterlib.Filter:
  """An nnx filter of the stage's trainable parameters: `nnx.Optimizer(model, tx, wrt=...)`,
  `nnx.split(model, trainable(stage), ...)`, `nnx.state(model, trainable(stage))`."""
  _check_stage(stage)
  return nnx.All(nnx.Param, lambda path, _: is_trainable(".".join(map(str, path)), stage))


def param_labels(params: Any, stage: int) -> Any:
  """`params` (an nnx.State or any pytree keyed by attribute names) with each leaf replaced by its
  label: FROZEN, DEFAULT or TEXT_ADAPTERS (for optax.multi_transform)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: label(dotted(path), stage), params)


def counts(model: nnx.Module, stage: int) -> dict[str, int]:
  """Parameter counts per label, and the total. Works on an abstract model (nnx.eval_shape)."""
  result = {DEFAULT: 0, TEXT_ADAPTERS: 0, FROZEN: 0}
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    result[label(".".join(map(str, path)), stage)] += int(np.prod(param.shape))
  if stage and not result[DEFAULT] + result[TEXT_ADAPTERS]:
    raise ValueError(f"nothing trains in stage {stage}: the model has no SAM3-I adapters "
                     "(Sam3Config.adapters=False)")
  result["total"] = sum(result.values())
  return result


def summary(model: nnx.Module, stage: int, print_fn: Callable[[str], Any] | None = print
            ) -> dict[str, int]:
  """Prints (with print_fn; None: quiet) a table of the stage's parameter counts; returns counts."""
  numbers = counts(model, stage)
  trained = numbers[DEFAULT] + numbers[TEXT_ADAPTERS]
  rows = [(f"trainable, LR group {TEXT_ADAPTERS}", numbers[TEXT_ADAPTERS]),
          (f"trainable, LR group {DEFAULT}", numbers[DEFAULT]),
          ("trainable", trained), ("frozen", numbers[FROZEN]), ("total", numbers["total"])]
  width = max(len(name) for name, _ in rows)
  lines = [f"stage {stage} parameters"] + [
      f"  {name:<{width}}  {n:>15,}  {100 * n / numbers['total']:5.1f}%" for name, n in rows]
  if print_fn is not None:
    print_fn("\n".join(lines))
  return numbers
