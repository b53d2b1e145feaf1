"""Stacked (scanned) layers: the stack table, scan semantics, and layouts written before stacking."""

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sam3i_jax.models import stacking
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.levels import Level
from sam3i_jax.models.sam3 import Sam3Image, abstract_model, host_counted_rngs
from sam3i_jax.models.text_encoder import Transformer, causal_bias
from sam3i_jax.pretrained import PARAMS_DIR, load_pretrained, save_pretrained
from sam3i_jax.train.checkpoints import Checkpoints, abstract_with_shardings
from sam3i_jax.tree_paths import dotted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(tree) -> dict:
  return {dotted(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def per_layer(flat_state: dict) -> dict:
  """A stacked layout's leaves as the per-layer leaves of the layout before stacking:
  `P.rest` (n, ...) -> `P.0.rest` ... `P.{n-1}.rest`, P being a stack's path."""
  out = {}
  for path, value in flat_state.items():
    match = re.match(r"(.*?(?:" + "|".join(stacking.STACKED_LAYERS) + r"))\.(.*)$", path)
    if match is None:
      out[path] = value
    else:
      out.update({f"{match.group(1)}.{i}.{match.group(2)}": layer for i, layer in enumerate(value)})
  return out


def nested(flat_tree: dict) -> dict:
  out = {}
  for path, value in flat_tree.items():
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_stack_table_names_exactly_the_models_stacks(preset):
  model = abstract_model(get_preset(preset, adapters=True))
  stacks = {".".join(map(str, path)): n for path, n in stacking.stacked_prefixes(model).items()}
  config = model.config
  assert stacks == {
      "backbone.vision_backbone.trunk.blocks": config.vit_depth,
      "backbone.language_backbone.encoder.transformer.resblocks": config.text_layers,
      "transformer.encoder.layers": config.num_enc_layers,
      "transformer.decoder.layers": config.num_dec_layers}
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
    path = dotted(path)
    inside = any(path.startswith(prefix + ".") for prefix in stacks)
    assert stacking.is_stacked_path(path) == inside, path
    if inside:
      assert leaf.shape[0] == stacks[next(p for p in stacks if path.startswith(p + "."))], path


def test_stacked_init_equals_layer_by_layer_init():
  """Stacking keeps each layer's own initial values (the RNG streams are consumed as before)."""
  config = get_preset("tiny", adapters=True)
  stacked = Transformer(config, rngs=nnx.Rngs(3))
  rngs = nnx.Rngs(3)
  from sam3i_jax.models.text_encoder import ResidualAttentionBlock
  layers = [ResidualAttentionBlock(config, rngs=rngs) for _ in range(config.text_layers)]
  for i, layer in enumerate(layers):
    want, got = flat(nnx.state(layer, nnx.Param)), flat(nnx.state(
        stacking.layer_at(stacked.resblocks, i), nnx.Param))
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"layer {i} {key}")


def test_scan_equals_the_layers_in_order_and_advances_dropout_streams():
  config = get_preset("tiny", adapters=True)
  encoder = Transformer(config, rngs=nnx.Rngs(0))
  # Perturbed parameters: the adapters' zero output projections would hide their dropout.
  params = nnx.state(encoder, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  nnx.update(encoder, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape),
                                   params))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, config.text_width)), jnp.float32)
  bias = jnp.asarray(causal_bias(8))
  run = nnx.jit(lambda m, x, level: m(x, bias, level), static_argnums=2)
  looped = x
  for i in range(config.text_layers):
    looped = stacking.layer_at(encoder.resblocks, i)(looped, bias, Level.COMPLEX)
  np.testing.assert_allclose(run(encoder, x, Level.COMPLEX), looped, rtol=1e-5, atol=1e-5)

  counts = lambda: np.asarray(  # noqa: E731
      encoder.resblocks.adapter12.mha_adapter.attn_drop.rngs.count[...])
  assert counts().shape == (config.text_layers,)
  before = counts()
  encoder.eval()
  run(encoder, x, Level.COMPLEX)
  np.testing.assert_array_equal(counts(), before)  # eval mode draws nothing
  encoder.train()
  first = run(encoder, x, Level.COMPLEX)
  np.testing.assert_array_equal(counts(), before + 1)  # one mask per layer, each its own stream
  second = run(encoder, x, Level.COMPLEX)
  assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-4  # fresh masks


def test_restack_errors_name_every_problem():
  target = {"a.blocks.w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
            "a.norm": jax.ShapeDtypeStruct((3,), jnp.float32)}
  source = {"a.blocks.0.w": np.zeros(3), "a.blocks.1.w": np.ones(3), "a.norm": np.ones(3)}
  out = stacking.restack(source, target)
  np.testing.assert_array_equal(out["a.blocks.w"], [[0, 0, 0], [1, 1, 1]])
  with pytest.raises(ValueError) as error:
    stacking.restack({"a.blocks.0.w": np.zeros(3), "a.norm": np.ones(4), "b": np.ones(1)}, target)
  message = str(error.value)
  assert "missing: a.blocks.w (2, 3)" in message  # layer 1 is absent
  assert "shape: a.norm (4,) -> expected (3,)" in message and "unexpected: b" in message


@pytest.fixture(scope="module")
def old_layout_directory(tmp_path_factory):
  """A converted tiny SAM3-I directory as sam3i-jax 0.1 wrote it (one parameter per layer)."""
  config = get_preset("tiny", adapters=True)
  model = Sam3Image(config, rngs=host_counted_rngs(5))
  directory = tmp_path_factory.mktemp("old") / "converted"
  save_pretrained(model, config, str(directory), vocab_path=None, report={"source": "test"})
  params = os.path.join(directory, PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    current = flat(checkpointer.restore(params))
  old = per_layer(current)
  assert len(old) > len(current)
  shutil.rmtree(params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params, nested(old))
  return str(directory), current


def test_old_layout_loads_and_migrates(old_layout_directory, tmp_path, capfd):
  directory, current = old_layout_directory
  model = load_pretrained(directory)
  assert "python -m convert migrate" in capfd.readouterr().err
  loaded = flat(nnx.state(model, nnx.Param))
  assert loaded.keys() == current.keys()
  for key, value in current.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)

  out = str(tmp_path / "migrated")
  result = subprocess.run([sys.executable, "-m", "convert", "migrate", "--input", directory,
                           "--output", out], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  with ocp.StandardCheckpointer() as checkpointer:
    written = flat(checkpointer.restore(os.path.join(out, PARAMS_DIR)))
  assert written.keys() == current.keys()  # the current (stacked) layout
  for key, value in current.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  load_pretrained(out)
  assert "restacking" not in capfd.readouterr().err


def test_old_layout_training_checkpoint_restores_restacked(tmp_path, capfd):
  """A train state (model + Adam moments + RNG streams) saved with one leaf per layer restores
  into the stacked layout: every leaf equal, the data-iterator-free meta kept."""
  model = Sam3Image(get_preset("tiny", adapters=True), rngs=host_counted_rngs(2))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  _, state = nnx.split((model, optimizer))
  state = jax.tree.map(lambda x: x, state)  # own buffers
  current = Checkpoints(tmp_path / "current")
  current.save(4, state, meta={"stage": 1})
  current.wait()
  raw = current.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = {dotted(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(raw["state"])}
  old = Checkpoints(tmp_path / "old")
  old.save(4, nested(per_layer(leaves)), meta={"stage": 1})
  old.wait()

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = abstract_with_shardings(state, jax.tree.map(lambda _: device, state))
  restored, meta = Checkpoints(tmp_path / "old").restore(None, abstract)
  assert "restacking" in capfd.readouterr().err and meta["stage"] == 1
  want = jax.tree_util.tree_leaves_with_path(state)
  got = jax.tree.leaves(restored)
  assert len(want) == len(got)
  for (path, a), b in zip(want, got):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=dotted(path))
