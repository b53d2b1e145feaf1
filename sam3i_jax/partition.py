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

Freezing on top of a stage (`freeze`, e.g. `--config.train.freeze="vision,text"` when fine-tuning
SAM 3): each entry is a name of `FREEZE_GROUPS` (SAM 3's parts) or a regular expression over the
dotted paths; what it matches is frozen whatever the stage trains, and an entry that matches no
parameter is an error (a misspelt name never silently trains everything).

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


# SAM 3's parts by name (Meta's state-dict prefixes), for `freeze`.
FREEZE_GROUPS: dict[str, str] = {
    "vision": r"^backbone\.vision_backbone\.",  # the ViT and its FPN neck
    "text": r"^backbone\.language_backbone\.",  # the text encoder and its resizer
    "geometry": r"^geometry_encoder\.",  # the box / point prompt encoder
    "fusion": r"^transformer\.encoder\.",  # the image-prompt fusion encoder
    "decoder": r"^transformer\.decoder\.",  # queries, layers, box and presence heads
    "heads": r"^(dot_prod_scoring|segmentation_head)\.",  # scoring and the mask heads
}


def freeze_patterns(freeze: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """The regular expressions of a freeze list: FREEZE_GROUPS names or regexes (a string is
  split at commas)."""
  entries = freeze.split(",") if isinstance(freeze, str) else list(freeze)
  patterns = []
  for entry in (e.strip() for e in entries):
    if not entry:
      continue
    pattern = FREEZE_GROUPS.get(entry, entry)
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"freeze entry {entry!r} is neither one of {tuple(FREEZE_GROUPS)} nor a "
                       f"regular expression ({e})") from None
    patterns.append(pattern)
  return tuple(patterns)


LR_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.language_backbone\.", TEXT_ADAPTERS),
    (r".*", DEFAULT),
)


def _first_match(rules, path: str):
  return next(value for pattern, value in rules if re.search(pattern, path))


def is_trainable(path: str, stage: int, freeze: tuple[str, ...] = ()) -> bool:
  """Whether the stage trains `path` and no `freeze_patterns` entry matches it."""
  if any(re.search(pattern, path) for pattern in freeze_patterns(freeze)):
    return False
  return _first_match(trainable_rules(curriculum.get(stage)), path)


def lr_group(path: str) -> str:
  """TEXT_ADAPTERS or DEFAULT for a dotted parameter path."""
  return _first_match(LR_GROUP_RULES, path)


def label(path: str, stage: int, freeze: tuple[str, ...] = ()) -> str:
  """FROZEN, or the LR group of a trainable parameter."""
  return lr_group(path) if is_trainable(path, stage, freeze) else FROZEN


def trainable(stage: int, freeze: tuple[str, ...] = ()) -> nnx.filterlib.Filter:
  """An nnx filter of the stage's trainable parameters less `freeze`: `nnx.Optimizer(model, tx,
  wrt=...)`, `nnx.split(model, trainable(stage), ...)`, `nnx.state(model, trainable(stage))`."""
  curriculum.get(stage)
  patterns = freeze_patterns(freeze)
  return nnx.All(nnx.Param, lambda path, _: is_trainable(".".join(map(str, path)), stage, patterns))


def check_freeze(model: nnx.Module, freeze: str | tuple[str, ...]) -> None:
  """ValueError naming each freeze entry that matches no parameter of `model`."""
  paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  entries = [e.strip() for e in (freeze.split(",") if isinstance(freeze, str) else freeze)]
  unmatched = [e for e in entries if e and not any(
      re.search(freeze_patterns((e,))[0], path) for path in paths)]
  if unmatched:
    raise ValueError(f"freeze entries {unmatched} match no parameter (names: "
                     f"{tuple(FREEZE_GROUPS)}, or regular expressions over dotted paths such as "
                     f"{paths[0]!r})")


def counts(model: nnx.Module, stage: int, freeze: tuple[str, ...] = ()) -> dict[str, int]:
  """Parameter counts per label, and the total. Works on an abstract model (nnx.eval_shape)."""
  result = {DEFAULT: 0, TEXT_ADAPTERS: 0, FROZEN: 0}
  patterns = freeze_patterns(freeze)
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    result[label(".".join(map(str, path)), stage, patterns)] += int(np.prod(param.shape))
  if not result[DEFAULT] + result[TEXT_ADAPTERS]:
    raise ValueError(f"nothing trains in stage {stage}: " + (
        f"freeze {patterns} covers everything the stage trains" if patterns else
        "the model has no SAM3-I adapters (Sam3Config.adapters=False)"))
  result["total"] = sum(result.values())
  return result


def summary(model: nnx.Module, stage: int, print_fn: Callable[[str], Any] | None = print,
            freeze: tuple[str, ...] = ()) -> dict[str, int]:
  """Prints (with print_fn; None: quiet) a table of the stage's parameter counts; returns counts."""
  numbers = counts(model, stage, freeze)
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
