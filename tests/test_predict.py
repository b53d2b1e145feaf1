"""The inference API and CLI on a converted (tiny, random-weight) checkpoint."""

import json
import os

import jax
import numpy as np
import parity
import pycocotools.mask as mask_utils
import pytest
from flax import nnx
from PIL import Image

from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.predict import Predictor, main, predict_folder
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


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """Four images of three sizes (PNG and JPEG, one in a subfolder), a corrupt JPEG and a text file."""
  folder = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(11)
  (folder / "sub").mkdir()
  for name, (h, w) in (("a.png", (150, 230)), ("b.jpg", (96, 64)), ("sub/c.png", (150, 230)),
                       ("d.jpeg", (200, 120))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
  (folder / "notes.txt").write_text("not an image")
  return folder


def test_folder_cli_writes_coco_results_and_reports_bad_files(predictor, converted, photo_folder,
                                                              tmp_path, capsys):
  output, pngs = tmp_path / "out" / "results.json", tmp_path / "pngs"
  texts = ["a striped umbrella", "a dog"]
  assert main(["--model", converted, "--images", str(photo_folder), "--text", texts[0], "--text",
               texts[1], "--threshold", "0.0", "--batch-size", "2", "--output", str(output),
               "--png-dir", str(pngs)]) == 0
  captured = capsys.readouterr()
  assert f"skipped {photo_folder / 'broken.jpg'}: " in captured.err
  assert "1 image(s) skipped" in captured.out and "broken.jpg: " in captured.out
  assert "1 file(s) without an image suffix" in captured.out and "notes.txt" in captured.out
  results = json.load(open(output))
  files = ["a.png", "b.jpg", "broken.jpg", "d.jpeg", "sub/c.png"]  # sorted, recursive
  by_key = {}
  for entry in results:
    by_key.setdefault((entry["image_id"], entry["category_id"]), []).append(entry)
  assert sorted(by_key) == [(i, c) for i in (1, 2, 4, 5) for c in (1, 2)]
  for (image_id, category_id), entries in by_key.items():
    name = files[image_id - 1]
    image = np.asarray(Image.open(photo_folder / name).convert("RGB"))
    # The batched folder run (2 images per batch, the last batch padded) = one image at a time.
    want = predictor.predict(str(photo_folder / name), texts[category_id - 1], threshold=0.0)
    assert all(e["file_name"] == name and e["text"] == texts[category_id - 1] for e in entries)
    np.testing.assert_allclose([e["score"] for e in entries], want.scores, rtol=1e-5)
    np.testing.assert_allclose([e["bbox"][:2] for e in entries], want.boxes_xyxy[:, :2],
                               rtol=1e-4, atol=1e-3)
    masks = mask_utils.decode([e["segmentation"] for e in entries]).transpose(2, 0, 1)
    assert masks.shape == (len(want.scores), *image.shape[:2])
    assert np.mean(masks != want.masks) < 1e-4
    assert (pngs / f"{os.path.splitext(name)[0]}.text{category_id}.png").is_file()

  # Images of other sizes, and a folder whose last batch is short, run the same programs.
  rng = np.random.default_rng(5)
  for folder, count in (("eight", 8), ("seven", 7)):
    (tmp_path / folder).mkdir()
    for i in range(count):
      size = tuple(int(v) for v in rng.integers(40, 300, 2))
      Image.fromarray(np.full((*size, 3), 9 * i, np.uint8)).save(tmp_path / folder / f"{i}.png")
  predict_folder(predictor, str(tmp_path / "eight"), texts[:1], str(tmp_path / "8.json"),
                 batch_size=4, log=lambda *_: None)
  counter = CompileCounter()
  assert predict_folder(predictor, str(tmp_path / "seven"), texts[:1], str(tmp_path / "7.json"),
                        batch_size=4, log=lambda *_: None) == {}
  assert counter.count == 0
  assert {e["image_id"] for e in json.load(open(tmp_path / "7.json"))} <= set(range(1, 8))


def test_folder_cli_refuses_bad_arguments(converted, photo_folder, tmp_path, capsys):
  with pytest.raises(SystemExit):
    main(["--model", converted, "--images", str(tmp_path / "missing"), "--text", "a dog",
          "--output", str(tmp_path / "r.json")])
  with pytest.raises(SystemExit):
    main(["--model", converted, "--image", "x.png", "--text", "a dog", "--text", "a cat",
          "--output", str(tmp_path / "r.png")])
  assert "--image takes one --text" in capsys.readouterr().err
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    main(["--model", converted, "--images", str(empty), "--text", "a dog",
          "--output", str(tmp_path / "r.json")])
