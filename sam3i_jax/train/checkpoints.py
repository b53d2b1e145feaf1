"""Training checkpoints: model + optimizer state, the data iterator and a small JSON record.

One orbax `CheckpointManager` item per part:
- "state": the pure pytree of the train state (parameters, optimizer moments, step, RNG
  counters), restored into an abstract target that carries the *current* mesh's shardings, so a
  run can resume on a different mesh shape;
- "data": the grain iterator state (one JSON file per process, grain's own handler). Restored
  by another number of processes, the saved position in the global example sequence is split
  anew (every process reads its block of each global batch, in lockstep; see
  input_pipeline.pipeline), so a run can resume on more or fewer hosts;
- "meta": the step, stage, config and metrics at save time.
Saves are atomic (orbax writes a temporary directory and renames it when complete); `keep` bounds
the number kept. A state saved before the repeated layers were stacked (sam3i-jax 0.1) is
restacked into the current layout on restore. A step that produced NaN/Inf is never saved (the
training loop checks first).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sam3i_jax.models.stacking import flat_leaves, restack_tree


class Checkpoints:
  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front: a fresh process can then read an item's metadata before its
    # first save or restore (without them orbax reports the state's metadata as None).
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, meta: dict | None = None
           ) -> None:
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": int(step), **(meta or {})})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None
              ) -> tuple[Any, dict]:
    """-> (state laid out as `abstract_state`'s shardings, meta). `data_iterator` is set in place.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` (e.g. from
    `jax.eval_shape` plus the mesh's shardings).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    saved = flat_leaves(self.manager.item_metadata(step)["state"])
    stacked = saved.keys() == flat_leaves(abstract_state).keys()
    items = {"meta": ocp.args.JsonRestore()}
    if stacked:
      items["state"] = ocp.args.StandardRestore(abstract_state)
    resplit = data_iterator is not None and self._data_position(step)
    if data_iterator is not None and not resplit:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if resplit:
      data_iterator.set_state(resplit)
      data_iterator.start_prefetch()
    state = restored["state"] if stacked else self._restacked(step, abstract_state)
    return state, dict(restored["meta"])

  def _data_position(self, step: int) -> dict | None:
    """None if this process's own iterator state was saved; else this process's share of the
    position saved by another number of processes ({"next_index": ...} of grain's iterator)."""
    folder = os.path.join(self.directory, str(step), "data")
    index, count = jax.process_index(), jax.process_count()
    if os.path.exists(os.path.join(folder, f"process_{index}-of-{count}.json")):
      return None
    saved = {}
    for path in glob.glob(os.path.join(folder, "process_*-of-*.json")):
      match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(path))
      with open(path) as f:
        saved[tuple(int(g) for g in match.groups())] = json.load(f)
    counts = {c for _, c in saved}
    problem = None
    if len(counts) != 1 or len(saved) != next(iter(counts)):
      problem = f"found {sorted(saved)} (process, count) states"
    elif any(set(state) != {"next_index"} for state in saved.values()):
      problem = "the states are not plain positions (grain worker processes were used)"
    elif len({state["next_index"] for state in saved.values()}) != 1:
      problem = "the processes were not at the same position"
    else:
      (saved_count,) = counts
      consumed = next(iter(saved.values()))["next_index"] * saved_count  # global examples
      if consumed % count:
        problem = f"{consumed} examples read cannot be split over {count} processes"
    if problem:
      raise ValueError(f"checkpoint {step} in {self.directory}: no data-iterator state for "
                       f"process {index} of {count}, and the saved ones cannot be split anew: "
                       f"{problem}; resume with the number of processes that saved it")
    print(f"checkpoint {step}: data position saved by {saved_count} process(es), split over "
          f"{count}", file=sys.stderr)
    return {"next_index": consumed // count}

  def _restacked(self, step: int, abstract_state: Any) -> Any:
    """A state saved before layers were stacked (per-layer leaves, sam3i-jax 0.1), restacked
    into `abstract_state`'s layout and shardings (sam3i_jax.models.stacking.restack_tree)."""
    print(f"checkpoint {step} in {self.directory}: per-layer state (written before layers were "
          "stacked); restacking it", file=sys.stderr)
    raw = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    try:
      return restack_tree(raw["state"], abstract_state)
    except ValueError as error:
      raise ValueError(f"checkpoint {step} in {self.directory} does not fit this model and "
                       f"optimizer: {error}") from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()  # waits for the saves in flight


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` (arrays or structs) carrying `shardings` (a matching pytree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
