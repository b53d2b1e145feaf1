"""One training step, jit-compiled over a device mesh with explicit shardings and donated state.

The train state is `nnx.split((model, optimizer))`: parameters (trainable and frozen), the
optimizer's moments for the trainable ones only (`nnx.Optimizer(wrt=...)`), its step count, and
the dropout RNG counters. Parameters and moments are laid out by the logical-axis tables of
`sam3i_jax.train.sharding`; the batch is split over the mesh axes of its logical "batch" axis. The step returns the
new state and replicated scalar metrics (loss terms, gradient norm, learning rates).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam3i_jax import curriculum
from sam3i_jax.losses.objective import ObjectiveConfig, loss_fn
from sam3i_jax.models.layers import compile_target
from sam3i_jax.train import sharding as sharding_lib

Batch = Mapping[str, jax.Array]


def forward(model: nnx.Module, batch: Batch, stage: curriculum.Stage) -> dict[str, Any]:
  """The model outputs `loss_fn` needs: one branch per level of the stage on one image encoding;
  for an aligning stage also the projected instruction embeddings and the concept anchors."""
  image = model.encode_image(batch["image"])
  outputs: dict[str, Any] = {}
  embeddings = {}
  for level in stage.levels:
    text = model.encode_text(batch[f"tokens_{level}"], level)
    outputs[level] = model.ground(image, text, level=level)
    if stage.alignment:
      embeddings[level] = model.instruction_embedding(text)
  if stage.alignment:
    concept = model.encode_text(batch["tokens_concept"], "concept")
    embeddings["concept"] = model.instruction_embedding(concept)
    outputs["embeddings"] = embeddings
  return outputs


def batch_shardings(batch: Batch, mesh: Mesh, rules=sharding_lib.LOGICAL_RULES) -> dict:
  return {key: sharding_lib.batch_sharding(mesh, np.ndim(value), rules)
          for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  stage: curriculum.Stage
  objective: ObjectiveConfig
  accum_steps: int = 1  # micro-batches per update; the batch must be divisible by it

  @classmethod
  def of_stage(cls, stage: int, accum_steps: int = 1, **objective) -> "StepConfig":
    """The step of curriculum stage `stage`: the objective of its levels (and alignment), with the
    other ObjectiveConfig settings from `objective`."""
    record = curriculum.get(stage)
    return cls(record, ObjectiveConfig(levels=record.levels, alignment=record.alignment,
                                       **objective), accum_steps)


def _micro_batches(batch: Batch, count: int) -> dict:
  """(count, B / count, ...) per key; micro-batch i holds every count-th example from i, so each
  device keeps an equal share of its rows in every micro-batch."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by accum_steps={count}")
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return {key: split(value) for key, value in batch.items()}


def make_step_fn(graphdef, wrt, config: StepConfig,
                 learning_rates: Callable[[jax.Array], dict[str, jax.Array]] | None = None):
  """The pure step (state, batch) -> (state, metrics), before jit. Gradient accumulation scans
  over micro-batches (one traced copy of the model) and averages gradients and metrics."""

  def objective(model, micro):
    return loss_fn(forward(model, micro, config.stage), micro, config.objective)

  grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    if config.accum_steps == 1:
      (_, metrics), grads = grad_fn(model, batch)
    else:
      model_def, model_state = nnx.split(model)

      def micro_step(carry, micro):
        model_state, grads, metrics = carry
        micro_model = nnx.merge(model_def, model_state)
        (_, micro_metrics), micro_grads = grad_fn(micro_model, micro)
        carry = (nnx.state(micro_model), jax.tree.map(jnp.add, grads, micro_grads),
                 jax.tree.map(jnp.add, metrics, micro_metrics))
        return carry, None

      shapes = jax.eval_shape(lambda m, b: grad_fn(nnx.merge(model_def, m), b),
                              model_state, jax.tree.map(lambda x: x[0], _micro_batches(
                                  batch, config.accum_steps)))
      (_, metric_shapes), grad_shapes = shapes
      zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
      (model_state, grads, metrics), _ = jax.lax.scan(
          micro_step, (model_state, zeros(grad_shapes), zeros(metric_shapes)),
          _micro_batches(batch, config.accum_steps))
      nnx.update(model, model_state)
      grads = jax.tree.map(lambda g: g / config.accum_steps, grads)
      metrics = jax.tree.map(lambda m: m / config.accum_steps, metrics)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    if learning_rates is not None:
      metrics.update({f"lr/{name}": lr for name, lr in
                      learning_rates(optimizer.step[...]).items()})
    optimizer.update(model, grads)
    # Checked with the loss before a step is saved: a non-finite update must not be checkpointed.
    metrics["param_norm"] = optax.global_norm(nnx.state(model, wrt))
    return nnx.state((model, optimizer)), metrics

  return step


class Trainer:
  """Holds the sharded train state and the compiled step of one stage."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, wrt, mesh: Mesh,
               config: StepConfig, *, learning_rates=None, param_axes=sharding_lib.PARAM_AXES,
               rules=sharding_lib.LOGICAL_RULES, compiler_options: dict | None = None):
    self.mesh, self.rules, self.wrt = mesh, rules, wrt
    self.compiler_options, self.learning_rates = compiler_options, learning_rates
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    self.graphdef, state = nnx.split((model, optimizer))
    self.state_shardings = sharding_lib.state_shardings(state, mesh, param_axes, rules)
    # A jitted identity places the state and gives every leaf its own buffer: donation fails on
    # arrays shared between leaves (e.g. adapter copies initialised from the same array).
    self.state = jax.jit(lambda s: s, out_shardings=self.state_shardings)(state)
    self.set_config(config)

  def set_config(self, config: StepConfig) -> None:
    """Steps from now on use `config` (e.g. another objective); compiled at the next step."""
    self.config = config
    self._step_fn = make_step_fn(self.graphdef, self.wrt, config, self.learning_rates)
    self._compiled = None

  def _compile(self, batch: Batch):
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.jit(self._step_fn,
                   in_shardings=(self.state_shardings, batch_shardings(batch, self.mesh,
                                                                       self.rules)),
                   out_shardings=(self.state_shardings, replicated), donate_argnums=0,
                   compiler_options=self.compiler_options)

  def step(self, batch: Batch) -> dict[str, jax.Array]:
    if self._compiled is None:
      self._compiled = self._compile(batch)
    with compile_target(self.platform):  # traced at the first call
      self.state, metrics = self._compiled(self.state, batch)
    return metrics

  def lower(self, batch: Batch):
    """The lowered step for `batch`'s shapes (e.g. `.compile().memory_analysis()`)."""
    with compile_target(self.platform):
      return self._compile(batch).lower(self.state, batch)

  @property
  def platform(self) -> str:
    """The platform of the mesh's devices, which attention_impl="auto" chooses for."""
    return self.mesh.devices.flat[0].platform

  def model(self) -> nnx.Module:
    """The current model (shares the state's arrays; call again after further steps)."""
    model, _ = nnx.merge(self.graphdef, self.state)
    return model
