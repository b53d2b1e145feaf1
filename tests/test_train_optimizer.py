"""The optimizer against the reference: torch AdamW param groups, clip_grad_norm_ and
sam3's InverseSquareRootParamScheduler, stepped the way sam3's trainer steps them."""

import numpy as np
import parity  # noqa: F401  (CPU set-up; must precede torch and sam3)
import pytest
import torch
from flax import nnx
from sam3.train.optim.schedulers import InverseSquareRootParamScheduler

from sam3i_jax.train import optimizer as opt_lib

TOTAL = 12
SCHEDULES = [opt_lib.ScheduleConfig(3, 3, 3, TOTAL), opt_lib.ScheduleConfig(1, 1, 3, TOTAL),
             opt_lib.ScheduleConfig(0, 2, 5, TOTAL), opt_lib.ScheduleConfig(4, 0, 2, TOTAL)]


@pytest.mark.parametrize("config", SCHEDULES, ids=str)
def test_schedule_matches_reference(config):
  ref = InverseSquareRootParamScheduler(2.0, config.warmup_steps, config.cooldown_steps,
                                        config.timescale)
  ours = opt_lib.inverse_sqrt_schedule(2.0, config)
  for step in range(TOTAL):
    np.testing.assert_allclose(float(ours(step)), ref(step=step, where=step / TOTAL), rtol=1e-6,
                               err_msg=f"step {step}")


class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.text = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.LayerNorm(3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.text(x)))


def torch_twin(model: Tiny) -> torch.nn.Module:
  twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
  with torch.no_grad():
    for layer, ours in ((twin[0], model.text), (twin[2], model.head)):
      layer.weight.copy_(torch.tensor(np.asarray(ours.kernel[...]).T))
      layer.bias.copy_(torch.tensor(np.asarray(ours.bias[...])))
    # Non-trivial norm parameters, so that decaying them by mistake would show.
    twin[1].weight.copy_(torch.tensor(np.asarray(model.norm.scale[...])))
    twin[1].bias.copy_(torch.tensor(np.asarray(model.norm.bias[...])))
  return twin


def test_adamw_groups_clip_and_decay_match_torch():
  model = Tiny(nnx.Rngs(0))
  model.norm.scale[...] = model.norm.scale[...] * 1.5
  model.norm.bias[...] = model.norm.bias[...] + 0.3
  twin = torch_twin(model)
  schedule = opt_lib.ScheduleConfig(2, 2, 3, 8)
  group_lrs = {"text": 0.05, "default": 0.2}
  tx = opt_lib.make_optimizer(group_lrs, lambda p: "text" if p.startswith("text") else "default",
                              opt_lib.layer_norm_paths(model), schedule, weight_decay=0.1,
                              clip_norm=0.1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  no_decay = [twin[0].bias, twin[1].weight, twin[1].bias, twin[2].bias]
  torch_groups = [
      {"params": [twin[0].weight], "lr": 0.05, "weight_decay": 0.1, "base": 0.05},
      {"params": [twin[0].bias], "lr": 0.05, "weight_decay": 0.0, "base": 0.05},
      {"params": [twin[2].weight], "lr": 0.2, "weight_decay": 0.1, "base": 0.2},
      {"params": [p for p in no_decay if p is not twin[0].bias], "lr": 0.2,
       "weight_decay": 0.0, "base": 0.2}]
  torch_opt = torch.optim.AdamW(torch_groups, betas=(0.9, 0.999), eps=1e-8)
  rng = np.random.default_rng(0)

  def loss_fn(m, x, y):
    return ((m(x) - y) ** 2).mean() * 50.0  # large gradients, so the clip is active

  for step in range(schedule.total_steps):
    x, y = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)

    torch_opt.zero_grad()
    ((twin(torch.tensor(x)) - torch.tensor(y)) ** 2).mean().mul(50.0).backward()
    total_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm=0.1)
    assert total_norm > 0.1
    for group in torch_opt.param_groups:
      group["lr"] = InverseSquareRootParamScheduler(group["base"], 2, 2, 3)(
          step=step, where=step / schedule.total_steps)
    torch_opt.step()

  pairs = [(model.text.kernel[...], twin[0].weight.T), (model.text.bias[...], twin[0].bias),
           (model.norm.scale[...], twin[1].weight), (model.norm.bias[...], twin[1].bias),
           (model.head.kernel[...], twin[2].weight.T), (model.head.bias[...], twin[2].bias)]
  for ours, ref in pairs:
    # Gradients agree to ~2e-5 relative (the 3-wide LayerNorm amplifies fp32 rounding); Adam
    # passes that on. A wrong LR group, decay or schedule moves parameters by >= 1e-2.
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), rtol=1e-4, atol=5e-5)


def test_decay_rule_by_path():
  norm_paths = ("blocks.0.ln_1",)
  assert opt_lib.decays("blocks.0.attn.kernel", norm_paths)
  assert not opt_lib.decays("blocks.0.attn.bias", norm_paths)
  assert not opt_lib.decays("blocks.0.ln_1.scale", norm_paths)
  assert opt_lib.decays("blocks.0.ln_10.scale", norm_paths)
