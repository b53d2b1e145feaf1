"""The curriculum records (sam3i_jax/curriculum.py) and the configuration that feeds them."""

import dataclasses

import pytest

from configs import hmpl
from sam3i_jax import curriculum
from sam3i_jax.losses.objective import ALIGNED_LEVELS
from sam3i_jax.models.adapters import ADDITIONS
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.levels import Level
from sam3i_jax.models.sam3 import abstract_model
from sam3i_jax.train import loop


@pytest.mark.parametrize("number", curriculum.STAGES)
def test_every_stage_names_known_groups_levels_and_stages(number):
  stage = curriculum.get(number)
  assert stage.number == number
  assert set(stage.trains) <= {curriculum.SAM3, *ADDITIONS} and stage.trains
  assert {Level(level) for level in stage.levels}
  assert not stage.alignment or set(ALIGNED_LEVELS) <= set(stage.levels)
  assert all(previous is None or previous in curriculum.STAGES for previous, _ in stage.entry)
  assert {Level(level) for level in stage.eval_levels or ("concept",)}


def test_an_unknown_stage_is_refused():
  with pytest.raises(ValueError, match="stage must be one of"):
    curriculum.get(4)


def test_one_seed_for_the_model_and_the_data():
  config = hmpl.get_config("smoke")
  config.unlock()
  config.seed = 7
  assert config.data.seed == 7
  config.data.seed = 9  # the same field under its other name
  assert config.seed == 9


def test_loss_weights_from_the_config_reach_the_objective():
  config = hmpl.get_config("smoke")
  config.unlock()
  config.loss.detection.loss_mask = 123.0
  config.loss.alignment.temperature = 0.5
  model = abstract_model(get_preset("tiny", adapters=True))
  objective = loop.stage_training(config, model, 3, num_steps=4).step_config(0).objective
  assert objective.detection.loss_mask == 123.0 and objective.alignment_weights.temperature == 0.5
  assert objective.levels == ("simple", "complex") and objective.alignment
  released = hmpl.get_config()
  assert dataclasses.asdict(loop.stage_training(released, model, 1, 4).step_config(0)
                            .objective.detection) == released.loss.detection.to_dict()
