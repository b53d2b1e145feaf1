"""SAM3-I's training curriculum as data: one record per stage.

The forward pass (`train.step.forward`: one branch per level, the alignment embeddings), the
objective (`losses.objective`, given the record's levels and alignment switch), the partition
(which parameter groups train), the training loop (entry migrations, data overrides, evaluation
levels) and the benchmarks all read these records. Adding a stage is adding a record here; a new
group of SAM3-I parameters is added to `models.adapters.ADDITIONS` and named in the stages that
train it.

  stage 0  every SAM 3 parameter on concept prompts: the demo's from-scratch training (the
           released recipe starts from sam3.pt instead); SAM3-I's additions stay frozen
  stage 1  the simple path: adapter1 everywhere + mask_predictor_adapter1
  stage 2  the complex path: adapter12 + adapter2 everywhere + mask_predictor_adapter2
  stage 3  both paths + the projection head, with the alignment losses between them
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from sam3i_jax.models.adapters import ADDITIONS, copy_mask_predictor, migrate_to_complex

SAM3 = "sam3"  # in `Stage.trains`: every parameter of SAM 3 itself (none of ADDITIONS)
Migration = Callable[[nnx.State], nnx.State]


@dataclasses.dataclass(frozen=True)
class Stage:
  number: int
  levels: tuple[str, ...]  # the instruction levels trained: one branch of the forward pass each
  trains: tuple[str, ...]  # SAM3 and/or groups of models.adapters.ADDITIONS; the rest is frozen
  alignment: bool = False  # the alignment losses between the simple and complex branches
  # (previous stage, migration of the parameters) applied when the stage starts after that one
  # (None: from the initial model).
  entry: tuple[tuple[int | None, Migration], ...] = ()
  data: tuple[tuple[str, Any], ...] = ()  # overrides of config.data for the stage's pipeline
  eval_levels: tuple[str, ...] | None = None  # None: the config's eval.levels

  def migration(self, previous: int | None) -> Migration | None:
    return dict(self.entry).get(previous)


STAGES: dict[int, Stage] = {
    # The adapters are untrained before stage 1: evaluate SAM 3's own (concept) level only.
    0: Stage(0, ("concept",), (SAM3,), eval_levels=("concept",)),
    # Whenever the adapters join a SAM 3 model, the mask-predictor copies follow its predictor.
    1: Stage(1, ("simple",), ("simple adapters", "simple mask predictor"),
             entry=((None, copy_mask_predictor), (0, copy_mask_predictor))),
    2: Stage(2, ("complex",), ("complex adapters", "complex mask predictor"),
             entry=((1, migrate_to_complex),)),
    # The concept anchors of the alignment losses use each entry's first concept.
    3: Stage(3, ("simple", "complex"), tuple(ADDITIONS), alignment=True,
             data=(("concept_choice", "first"),)),
}


def get(stage: int) -> Stage:
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
  return STAGES[stage]
