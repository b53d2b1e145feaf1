"""The released optimizer: AdamW per LR group, global-norm clipping, the inverse-sqrt schedule.

As SAM 3's trainer (`sam3/train/trainer.py`, `optim/schedulers.py`) with SAM3-I's configs: the
gradients of all trainable parameters are clipped together to global L2 norm 0.1, then each LR
group gets its own AdamW (betas 0.9/0.999, eps 1e-8) whose learning rate follows
`InverseSquareRootParamScheduler`; weight decay 0.1 everywhere except on biases and LayerNorm
parameters. Update k (0-based) uses the schedule at step k, as the reference steps its schedulers
before each optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sam3i_jax.tree_paths import dotted


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  warmup_steps: int = 3
  cooldown_steps: int = 3
  timescale: int = 3
  total_steps: int = 1


def inverse_sqrt_schedule(base_lr: float, config: ScheduleConfig) -> optax.Schedule:
  """lr(step): linear warmup, then base * sqrt(timescale / (step + timescale - warmup)),
  times a linear cooldown over the last `cooldown_steps` of `total_steps`."""
  warmup, cooldown = config.warmup_steps, config.cooldown_steps
  timescale, total = float(config.timescale), float(config.total_steps)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    lr = jnp.where(step > warmup,
                   base_lr / jnp.sqrt((step + timescale - warmup) / timescale), base_lr)
    if warmup:
      lr = lr * jnp.minimum(1.0, step / warmup)
    if cooldown:
      # The reference derives the total from where = step / total, which is undefined at step
      # 0; it then uses a total of 1.
      steps_total = jnp.where(step > 0, total, 1.0)
      lr = lr * jnp.minimum(1.0, (steps_total - step) / cooldown)
    return lr

  return schedule


def layer_norm_paths(model: nnx.Module) -> tuple[str, ...]:
  """Dotted paths of every nnx.LayerNorm in `model` (their parameters take no weight decay)."""
  return tuple(".".join(map(str, path)) for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.LayerNorm))


def decays(path: str, norm_paths: tuple[str, ...]) -> bool:
  """Weight decay applies except to biases ('*bias*') and LayerNorm parameters."""
  if "bias" in path:
    return False
  return not any(path.startswith(prefix + ".") for prefix in norm_paths)


def make_optimizer(group_lrs: Mapping[str, float], group_of: Callable[[str], str],
                   norm_paths: tuple[str, ...], schedule: ScheduleConfig, *,
                   weight_decay: float = 0.1, clip_norm: float | None = 0.1
                   ) -> optax.GradientTransformation:
  """AdamW per LR group over trainable params whose dotted paths map to groups by `group_of`."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(dotted(p)), params)

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(dotted(p), norm_paths),
                                            params)

  groups = {
      name: optax.adamw(inverse_sqrt_schedule(lr, schedule), b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=weight_decay, mask=decay_mask)
      for name, lr in group_lrs.items()}
  chain = [optax.multi_transform(groups, labels)]
  if clip_norm is not None:
    chain.insert(0, optax.clip_by_global_norm(clip_norm))
  return optax.chain(*chain)
