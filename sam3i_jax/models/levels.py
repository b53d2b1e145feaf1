"""The three instruction levels of SAM3-I; the caller picks one per prompt (it is not inferred).

A level is a static choice: each one compiles its own path through the model. The reference code's
`text_type` integers map as concept = 1, simple = 2, complex = 4 (3, its frozen-S-copy ablation, is
not supported).
"""

from __future__ import annotations

import enum


class Level(str, enum.Enum):
  CONCEPT = "concept"  # a noun phrase ("helmet"): SAM 3 itself, no adapter runs
  SIMPLE = "simple"  # a referring phrase with attributes, positions, relations: the S-adapters
  COMPLEX = "complex"  # a functional or reasoning instruction: the cascaded C-path


def parse_level(level: Level | str, has_adapters: bool = True) -> Level:
  """`level` as a Level; accepts a Level or its exact string value, rejects anything else, and
  rejects simple / complex for a model built without adapters (`has_adapters` False)."""
  parsed = level if isinstance(level, Level) else None
  if parsed is None and isinstance(level, str):
    parsed = next((choice for choice in Level if choice.value == level), None)
  if parsed is None:
    raise ValueError(f"instruction level must be one of {[choice.value for choice in Level]} "
                     f"(or a sam3i_jax.models.levels.Level), got {level!r}")
  if parsed is not Level.CONCEPT and not has_adapters:
    raise ValueError(f"level {parsed.value!r} needs the SAM3-I adapters, but this model was built "
                     "without them (Sam3Config.adapters=False); only 'concept' is available")
  return parsed
