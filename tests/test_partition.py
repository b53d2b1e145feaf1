"""The parameter partition of SAM3-I's curriculum (sam3i_jax.partition)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sam3i_jax import curriculum, partition
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import abstract_model
from sam3i_jax.pretrained import materialise
from sam3i_jax.tree_paths import dotted

from released_keys import released_image_model

# What the image model knowingly does not convert (see convert.sam3.IGNORED_GROUPS).
NOT_CONVERTED = (".sam2_convs.", "freqs_cis", "text_projection")


def released_sam3_parameter_count() -> int:
  """SAM 3's image model as released (the 1134 tensors of sam3.pt's detector), less the tensors the
  port knowingly drops."""
  return sum(int(np.prod(shape)) for key, (shape, _) in released_image_model().items()
             if not any(part in key for part in NOT_CONVERTED))


def sam3i_counts(text_width=1024, text_layers=24, heads_bottleneck=64, d=256, bottleneck=64,
                 enc_layers=6, dec_layers=6) -> dict:
  """Parameter counts of SAM3-I's additions, from the reference modules' shapes."""
  linear = lambda i, o: i * o + o
  text_adapter = (linear(text_width, 3 * text_width) + linear(text_width, text_width)  # MHA
                  + linear(text_width, heads_bottleneck) + linear(heads_bottleneck, text_width)
                  + 2 * 2 * text_width)  # two LayerNorms
  bottleneck_adapter = linear(d, bottleneck) + 2 * bottleneck + linear(bottleneck, d)
  per_path = text_layers * text_adapter + (enc_layers + dec_layers) * bottleneck_adapter
  mask_predictor = 3 * linear(d, d)
  head = 2 * linear(d, d) + 2 * d
  return {"text adapter": text_adapter, "text per path": text_layers * text_adapter,
          "stage 1": per_path + mask_predictor, "stage 2": 2 * per_path + mask_predictor,
          "stage 3": 3 * per_path + 2 * mask_predictor + head}


def test_full_size_counts_match_the_released_architecture():
  model = abstract_model(get_preset("full", adapters=True))  # shapes only
  expected = sam3i_counts()
  assert expected["text adapter"] == 4_334_656  # as SAM3-I's own count (sam3i_method.md)
  sam3 = released_sam3_parameter_count()
  for stage in (1, 2, 3):
    counts = partition.summary(model, stage, print_fn=None)
    trained = counts[partition.DEFAULT] + counts[partition.TEXT_ADAPTERS]
    assert trained == expected[f"stage {stage}"], stage
    assert counts["total"] == sam3 + expected["stage 3"]
    assert counts[partition.FROZEN] == counts["total"] - trained
  assert counts[partition.TEXT_ADAPTERS] == 3 * expected["text per path"] == 312_095_232
  assert trained == 313_817_856 and counts["total"] == 1_153_803_318  # ~314M of ~1.15B
  stage0 = partition.counts(model, 0)
  assert stage0[partition.FROZEN] == expected["stage 3"]
  assert stage0["total"] - stage0[partition.FROZEN] == sam3


@pytest.fixture(scope="module")
def tiny():
  return abstract_model(get_preset("tiny", adapters=True))


def leaf_paths(model) -> list[tuple]:
  return [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def expected_trainable(path: tuple, stage: int) -> bool:
  """The stages as SAM3-I trains them, written on path tuples (independently of the regexes)."""
  simple = "adapter1" in path or path[:2] == ("segmentation_head", "mask_predictor_adapter1")
  complex_ = ("adapter12" in path or "adapter2" in path
              or path[:2] == ("segmentation_head", "mask_predictor_adapter2"))
  head = path[0] == "simple_query_proj"
  return {0: not (simple or complex_ or head), 1: simple, 2: complex_, 3: simple or complex_ or head}[stage]


def param_labels(params, stage: int):
  """Each leaf of `params` replaced by its label (FROZEN or an LR group), for optax.multi_transform."""
  return jax.tree_util.tree_map_with_path(lambda path, _: partition.label(dotted(path), stage), params)


@pytest.mark.parametrize("stage", curriculum.STAGES)
def test_trainable_sets(tiny, stage):
  chosen = {path for path, _ in nnx.to_flat_state(nnx.state(tiny, partition.trainable(stage)))}
  expected = {path for path in leaf_paths(tiny) if expected_trainable(path, stage)}
  assert chosen == expected and chosen
  labels = param_labels(nnx.state(tiny, nnx.Param), stage)
  flat_labels = dict(zip(leaf_paths(tiny), jax.tree.leaves(labels)))
  for path, label in flat_labels.items():
    if path not in expected:
      assert label == partition.FROZEN, path
    else:
      text = path[:2] == ("backbone", "language_backbone")
      assert label == (partition.TEXT_ADAPTERS if text else partition.DEFAULT), path


def test_optimizer_updates_each_group_at_its_rate():
  """The labels drive optax.multi_transform inside nnx.Optimizer(wrt=trainable(stage))."""
  graphdef, state = nnx.split(abstract_model(get_preset("tiny", adapters=True)))
  model = nnx.merge(graphdef, jax.tree.map(materialise, state))  # all parameters zero
  before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  rates = {partition.DEFAULT: 0.5, partition.TEXT_ADAPTERS: 0.25}
  tx = optax.multi_transform({k: optax.sgd(lr) for k, lr in rates.items()},
                             lambda params: param_labels(params, 1))
  optimizer = nnx.Optimizer(model, tx, wrt=partition.trainable(1))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, partition.trainable(1)))
  optimizer.update(model, grads)
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(map(str, path))
    step = rates[partition.lr_group(name)] if partition.is_trainable(name, 1) else 0.0
    np.testing.assert_allclose(before[path] - np.asarray(value[...]), step, atol=1e-6, err_msg=name)


def test_sam3_model_stages():
  model = abstract_model(get_preset("tiny"))
  counts = partition.counts(model, 0)
  assert counts[partition.FROZEN] == 0 and counts["total"] > 0
  with pytest.raises(ValueError, match="no SAM3-I adapters"):
    partition.counts(model, 1)
  with pytest.raises(ValueError, match="stage must be one of"):
    partition.trainable(4)


def test_summary_prints_a_table(tiny):
  lines = []
  counts = partition.summary(tiny, 3, print_fn=lines.append)
  table = lines[0]
  assert f"{counts['total']:,}" in table and f"{counts[partition.TEXT_ADAPTERS]:,}" in table
  assert "frozen" in table and "trainable, LR group text_adapters" in table


def test_freeze_by_part_names_and_regexes_on_top_of_stage_0():
  tiny = abstract_model(get_preset("tiny", adapters=False))
  paths = [dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(tiny, nnx.Param))[0]]
  # The named parts cover every SAM 3 parameter, each exactly one part.
  groups = {name: {p for p in paths if partition.is_trainable(p, 0) and not
                   partition.is_trainable(p, 0, (name,))} for name in partition.FREEZE_GROUPS}
  assert all(groups.values()), {k for k, v in groups.items() if not v}
  assert sum(map(len, groups.values())) == len(paths) == len(set().union(*groups.values()))
  assert all(p.startswith("backbone.vision_backbone.") for p in groups["vision"])
  freeze = "vision, text,^transformer\\.decoder\\.layers\\."
  trained = {dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(tiny, partition.trainable(0, freeze)))[0]}
  assert trained == set(paths) - groups["vision"] - groups["text"] - {
      p for p in paths if p.startswith("transformer.decoder.layers.")}
  counts = partition.counts(tiny, 0, freeze)
  assert counts[partition.TEXT_ADAPTERS] == 0 and counts[partition.FROZEN] > counts[partition.DEFAULT]
  partition.check_freeze(tiny, freeze)
  with pytest.raises(ValueError, match=r"\['visoin'\] match no parameter"):
    partition.check_freeze(tiny, "visoin,text")
  with pytest.raises(ValueError, match="neither one of"):
    partition.freeze_patterns("decoder,(unclosed")
  with pytest.raises(ValueError, match="covers everything"):
    partition.counts(tiny, 0, ".*")
