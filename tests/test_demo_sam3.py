"""The demo's tiny SAM 3 in assets/ (what `configs/hmpl.py:demo` starts from)."""

import itertools

import input_pipeline
from configs import hmpl
from sam3i_jax.evaluation.evaluate import evaluate
from sam3i_jax.models.config import get_preset
from sam3i_jax.pretrained import load_pretrained, read_config


def test_demo_sam3_is_the_tiny_preset_with_adapters():
  assert hmpl.get_config("demo").init.checkpoint == hmpl.DEMO_SAM3_DIR
  assert read_config(hmpl.DEMO_SAM3_DIR) == get_preset("tiny", adapters=True)


def test_demo_sam3_segments_the_demo_concepts():
  """A trained model, not a random one: on the first 24 val samples of the 1toAll set (every
  instance of the concept) it keeps good masks. gIoU there was 74 over the whole set; an
  untrained model keeps nothing (0)."""
  config = hmpl.get_config("demo")
  model = load_pretrained(config.init.checkpoint)
  datasets = ["HMPL-Instruct_1toAll"]
  pipeline = input_pipeline.eval_pipeline(config.data, model.config, datasets=datasets)
  results = evaluate(model, itertools.islice(pipeline.iterator(), 3), levels=("concept",),
                     datasets=datasets, log=lambda *_: None)
  assert results["all"]["count"] == 24
  assert results["level=concept"]["gIoU"] > 50 and results["level=concept"]["P@0.5"] > 50
