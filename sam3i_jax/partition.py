"""Which parameters train in each stage of SAM3-I's curriculum, and their learning-rate groups.

The rules are data: regular expressions over dotted parameter paths (the PyTorch state-dict keys
up to the leaf name and the index of a stacked layer, e.g.
`transformer.decoder.layers.adapter12.up_proj.kernel`), first match wins, as in big_vision. A
stage trains the groups its `curriculum.Stage.trains` names (`models.adapters.ADDITIONS`, or SAM 3
itself) and freezes everything else.

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

import numpy as np
from flax import nnx

from sam3i_jax import curriculum
from sam3i_jax.models.adapters import ADDITIONS

FROZEN = "frozen"
DEFAULT = "default"
TEXT_ADAPTERS = "text_adapters"


def trainable_rules(stage: curriculum.Stage) -> tuple[tuple[str, bool], ...]:
  """(pattern, trainable) over dotted paths, first match wins: the groups the stage trains."""
  additions = tuple((group.pattern, name in stage.trains) for name, group in ADDITIONS.items())
  return additions + ((r".*", curriculum.SAM3 in stage.trains),)


LR_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.language_backbone\.", TEXT_ADAPTERS),
    (r".*", DEFAULT),
)


def _first_match(rules, path: str):
  return next(value for pattern, value in rules if re.search(pattern, path))


def is_trainable(path: str, stage: int) -> bool:
  return _first_match(trainable_rules(curriculum.get(stage)), path)


def lr_group(path: str) -> str:
  """TEXT_ADAPTERS or DEFAULT for a dotted parameter path."""
  return _first_match(LR_GROUP_RULES, path)


def label(path: str, stage: int) -> str:
  """FROZEN, or the LR group of a trainable parameter."""
  return lr_group(path) if is_trainable(path, stage) else FROZEN


def trainable(stage: int) -> nnx.filterlib.Filter:
  """An nnx filter of the stage's trainable parameters: `nnx.Optimizer(model, tx, wrt=...)`,
  `nnx.split(model, trainable(stage), ...)`, `nnx.state(model, trainable(stage))`."""
  curriculum.get(stage)
  return nnx.All(nnx.Param, lambda path, _: is_trainable(".".join(map(str, path)), stage))


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
