"""Each layout rule of the converter, checked by running the PyTorch layer and the loaded Flax layer."""

import jax.numpy as jnp
import numpy as np
import parity
import pytest
import torch
from flax import nnx

from convert.torch_layout import ConversionError, load_state_dict, param_table
from sam3i_jax.models import layers

RNG = np.random.default_rng(0)


def torch_state(module: torch.nn.Module, prefix: str = "") -> dict:
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape) * 0.1)
  return module.eval()


def test_linear_is_transposed():
  ref = perturbed(torch.nn.Linear(5, 7))
  ours = layers.dense(5, 7, rngs=nnx.Rngs(0))
  load_state_dict(ours, torch_state(ref))
  x = RNG.standard_normal((3, 5)).astype(np.float32)
  parity.assert_close(ours(jnp.asarray(x)), ref(torch.from_numpy(x)).detach().numpy(), 1e-6)


@pytest.mark.parametrize("kernel,padding", [(1, 0), (3, 1), (7, 0)])
def test_conv_oihw_to_hwio(kernel, padding):
  ref = perturbed(torch.nn.Conv2d(4, 6, kernel, padding=padding))
  ours = layers.conv(4, 6, kernel, padding=padding, rngs=nnx.Rngs(0))
  load_state_dict(ours, torch_state(ref))
  x = RNG.standard_normal((2, 4, 9, 9)).astype(np.float32)
  got = ours(jnp.asarray(x.transpose(0, 2, 3, 1)))
  parity.assert_close(got, ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1), 1e-6)


def test_layer_norm_weight_is_scale_and_eps_matches_torch():
  ref = perturbed(torch.nn.LayerNorm(6))
  ours = layers.layer_norm(6, rngs=nnx.Rngs(0))
  load_state_dict(ours, torch_state(ref))
  x = (RNG.standard_normal((4, 6)) * 1e-3).astype(np.float32)  # tiny variance: eps matters
  parity.assert_close(ours(jnp.asarray(x)), ref(torch.from_numpy(x)).detach().numpy(), 1e-6)


def test_embedding_weight():
  ref = perturbed(torch.nn.Embedding(10, 4))
  ours = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  load_state_dict(ours, torch_state(ref))
  np.testing.assert_array_equal(ours.embedding[...], ref.weight.detach().numpy())


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's own
@pytest.mark.parametrize("impl", ["xla", "per_head"])
def test_fused_in_proj_multihead_attention(impl):
  ref = perturbed(torch.nn.MultiheadAttention(8, 2, batch_first=True))
  ours = layers.MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
  ours.attention_impl = impl
  assert {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"} == set(param_table(ours))
  load_state_dict(ours, torch_state(ref))
  q = RNG.standard_normal((2, 3, 8)).astype(np.float32)
  kv = RNG.standard_normal((2, 5, 8)).astype(np.float32)
  pad = np.array([[False] * 5, [False, False, False, True, True]])
  want = ref(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
             key_padding_mask=torch.from_numpy(pad), need_weights=False)[0].detach().numpy()
  bias = RNG.standard_normal((2, 2, 3, 5)).astype(np.float32)
  want_biased = ref(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
                    key_padding_mask=torch.from_numpy(pad), attn_mask=torch.from_numpy(bias).flatten(0, 1),
                    need_weights=False)[0].detach().numpy()
  got = ours(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(kv), key_padding_mask=jnp.asarray(pad))
  parity.assert_close(got, want, 1e-6)
  got = ours(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(kv), key_padding_mask=jnp.asarray(pad),
             bias=jnp.asarray(bias))
  parity.assert_close(got, want_biased, 1e-6, "per-head bias")


def test_strict_load_lists_every_problem():
  ours = layers.MLP(4, 8, 2, 2, rngs=nnx.Rngs(0))
  state = torch_state(perturbed(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))), "layers.")
  state["layers.9.weight"] = np.zeros((1, 1), np.float32)
  del state["layers.0.bias"]
  with pytest.raises(ConversionError) as err:
    load_state_dict(ours, state)
  message = str(err.value)
  assert "missing: 1" in message and "layers.0.bias" in message
  assert "unexpected: 1" in message and "layers.9.weight" in message
  assert "shape mismatch: 2" in message and "layers.1.weight: (3, 8)" in message


def test_ignored_tensors_are_reported_not_loaded():
  ours = layers.dense(2, 2, rngs=nnx.Rngs(0))
  state = torch_state(perturbed(torch.nn.Linear(2, 2)))
  state["tracker.x"] = np.zeros(3, np.float32)
  report = load_state_dict(ours, state, ignore={"tracker": lambda k: k.startswith("tracker.")})
  assert report.ok and report.ignored == {"tracker": ["tracker.x"]} and len(report.loaded) == 2
