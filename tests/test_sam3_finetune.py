"""configs/sam3_finetune.py through the training loop: a converted SAM 3 (Meta's layout, tiny,
random weights, no SAM3-I adapters) fine-tuned on the demo set's COCO export with parts frozen by
name and regex, evaluated with COCO AP, logged to metrics.json and TensorBoard."""

import json

import numpy as np
import parity
import pytest

from configs import sam3_finetune
from run_records import final_params, logged_rows, params
from sam3i_jax.pretrained import load_pretrained
from sam3i_jax.train import loop


def test_finetune_trains_the_unfrozen_parts_and_reports_coco_ap(tmp_path, jax_cache):
  sam3 = parity.converted_checkpoint("tiny", str(tmp_path))
  config = sam3_finetune.get_config("demo")
  config.unlock()
  config.init.checkpoint = sam3
  config.workdir = str(tmp_path / "run")
  config.compilation_cache_dir = str(jax_cache)
  config.stage_settings.stage0.steps = 2
  config.train.update(log_every=1, checkpoint_every=2, freeze="vision,text,^geometry_encoder\\.")
  config.eval.update(max_batches=1, num_images=1)  # 8 samples: the first image x 8 categories
  config.lock()
  results = loop.run(config)
  tmp_path = tmp_path / "run"

  group = results["stage0"]["level=concept/dataset=demo_coco"]
  assert group["count"] == 8 and group["AP_images"] == 1 and group["AP_images_left_out"] == 0
  assert {"box_AP", "mask_AP", "mask_AP50"} <= group.keys()
  with open(tmp_path / "metrics.json") as f:
    assert json.load(f)["stage0"]["level=concept/dataset=demo_coco"] == group
  assert [row["level=concept/dataset=demo_coco/mask_AP"] for row in logged_rows(tmp_path, "eval")
          ] == [results[phase]["level=concept/dataset=demo_coco"]["mask_AP"]
                for phase in (loop.INITIAL, "stage0")]
  assert list((tmp_path / "tensorboard").iterdir())

  before, after = params(load_pretrained(sam3)), final_params(tmp_path, 0)
  assert not load_pretrained(tmp_path / "stage0" / loop.FINAL_DIR).config.adapters
  assert before.keys() == after.keys()
  frozen = ("backbone", "geometry_encoder")  # vision and text are under backbone
  for key, value in before.items():
    if key[0] in frozen:
      np.testing.assert_array_equal(after[key], value, err_msg=str(key))
  moved = {k[:2] for k in before if k[0] not in frozen and not np.array_equal(after[k], before[k])}
  assert {("transformer", "decoder"), ("transformer", "encoder")} <= moved
  assert ("segmentation_head", "pixel_decoder") in moved

  # The SAM3-I stages need the adapters, which this checkpoint does not hold.
  config.unlock()
  config.stages = (0, 1)
  with pytest.raises(ValueError, match=r"without the SAM3-I adapters, which stage\(s\) \[1\]"):
    loop.model_config(config)
