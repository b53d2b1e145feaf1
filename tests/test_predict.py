"""The inference API and CLI on a converted (tiny, random-weight) checkpoint."""

import os

import jax
import numpy as np
import parity
import pytest
from flax import nnx
from PIL import Image

from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.predict import Predictor, main
from sam3i_jax.preprocess import preprocess


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return parity.converted_checkpoint("tiny", str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def predictor(converted):
  return Predictor.from_pretrained(converted)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
  path = str(tmp_path_factory.mktemp("img") / "photo.png")
  Image.fromarray(image).save(path)
  return path, image


class CompileCounter:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def test_predict_equals_model_plus_postprocess(predictor, photo):
  path, image = photo
  # Random weights rarely pass 0.5: a threshold of 0 keeps every query, so the check is not vacuous.
  result = predictor.predict(path, "a striped umbrella", threshold=0.0)
  tokens = predictor.tokenizer(["a striped umbrella"])
  pixels = preprocess(image, predictor.config.img_size)[None]
  out = jax.device_get(nnx.jit(lambda m, p, t: m(p, t))(predictor.model, pixels, tokens))
  want = postprocess(out["pred_logits"][0], out["pred_boxes"][0], out["pred_masks"][0],
                     out["presence_logit"][0], image.shape[:2], threshold=0.0)
  assert result.image_size == (150, 230) and result.masks.shape == (predictor.config.num_queries, 150, 230)
  np.testing.assert_allclose(result.scores, want["scores"], rtol=1e-5)
  np.testing.assert_allclose(result.boxes_xyxy, want["boxes_xyxy"], rtol=1e-4, atol=1e-3)
  assert np.mean(result.masks != want["masks"]) < 1e-4


def test_new_prompts_do_not_recompile(predictor, photo):
  path, _ = photo
  encoded = predictor.encode_image(path)
  predictor.predict(encoded, "a dog")
  predictor.predict(encoded, "a dog", boxes=[[0.5, 0.5, 0.3, 0.3]])
  counter = CompileCounter()
  predictor.predict(encoded, "the helmet of the rider on the black horse")
  predictor.predict(encoded, "a cat", boxes=[[0.2, 0.3, 0.1, 0.2], [0.6, 0.6, 0.3, 0.3]], box_labels=[True, False])
  predictor.predict(path, "what protects the riders' heads")  # new image of the same size
  assert counter.count == 0


def test_box_prompt_changes_the_prediction(predictor, photo):
  path, _ = photo
  encoded = predictor.encode_image(path)
  plain = predictor.predict(encoded, "a dog", threshold=0.0)
  boxed = predictor.predict(encoded, "a dog", boxes=[[0.5, 0.5, 0.3, 0.3]], threshold=0.0)
  assert not np.allclose(plain.scores, boxed.scores)


def test_bad_inputs_are_rejected(predictor, photo):
  with pytest.raises(ValueError, match="uint8"):
    predictor.predict(np.zeros((10, 10), np.float32), "a dog")
  with pytest.raises(ValueError, match="labels"):
    predictor.predict(photo[0], "a dog", boxes=[[0.5, 0.5, 0.2, 0.2]], box_labels=[True, False])
  with pytest.raises(ValueError, match="normalised"):
    predictor.predict(photo[0], "a dog", boxes=[[100, 50, 20, 20]])


def test_cli_writes_an_overlay_png(converted, photo, tmp_path, capsys):
  path, image = photo
  output = str(tmp_path / "out.png")
  assert main(["--model", converted, "--image", path, "--text", "a dog", "--box", "0.5,0.5,0.4,0.4",
               "--box", "0.2,0.2,0.1,0.1:neg", "--threshold", "0.0", "--output", output]) == 0
  drawn = np.asarray(Image.open(output))
  assert drawn.shape == image.shape and not np.array_equal(drawn, image)
  assert "wrote" in capsys.readouterr().out
  assert os.path.getsize(output) > 0


@pytest.fixture(scope="module")
def sam3i_predictor(tmp_path_factory):
  """A SAM3-I model from the tiny SAM 3 checkpoint (`convert sam3 --adapters`: identity adapters)."""
  from convert.sam3 import convert_sam3
  from full_size_reference import released_layout
  import torch

  config, model, _ = parity.reference_model("tiny")
  directory = tmp_path_factory.mktemp("tiny_sam3i")
  torch.save(released_layout(model), directory / "sam3.pt")
  out = str(directory / "converted")
  convert_sam3(str(directory / "sam3.pt"), out, base=config, adapters=True, log=lambda *_: None)
  return Predictor.from_pretrained(out), out


def test_levels(sam3i_predictor, predictor, photo, tmp_path, capsys):
  sam3i_predictor, directory = sam3i_predictor
  path, image = photo
  encoded = sam3i_predictor.encode_image(path)
  text = "what keeps the rider's head safe"
  complex_ = sam3i_predictor.predict(encoded, text, threshold=0.0, level="complex")
  sam3 = predictor.predict(path, text, threshold=0.0)  # the same SAM 3 weights
  np.testing.assert_allclose(complex_.scores, sam3.scores, rtol=1e-5)  # untrained adapters
  counter = CompileCounter()
  sam3i_predictor.predict(encoded, "the helmet on the left", level="complex")  # compiled per level
  output = str(tmp_path / "out.png")
  assert main(["--model", directory, "--image", path, "--text", text, "--level", "complex",
               "--threshold", "0.0", "--output", output]) == 0
  assert counter.count == 0
  assert np.asarray(Image.open(output)).shape == image.shape
  with pytest.raises(ValueError, match="without them"):
    predictor.predict(encoded, text, level="simple")  # a SAM 3 model has no adapters
  with pytest.raises(SystemExit):
    main(["--model", directory, "--image", path, "--text", text, "--level", "2",
          "--output", output])
  assert "invalid choice" in capsys.readouterr().err
