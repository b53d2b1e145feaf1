"""COCO box and mask AP (sam3i_jax/evaluation/coco_ap.py) through the eval pipeline and `evaluate`,
against pycocotools run directly on the annotation file and the same model's predictions made
image by image with the Predictor; and the accumulator's bookkeeping."""

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import input_pipeline
from configs import hmpl
from input_pipeline import demo_data
from sam3i_jax.evaluation import coco_ap
from sam3i_jax.evaluation.evaluate import evaluate, format_table
from sam3i_jax.predict import Predictor, coco_results
from sam3i_jax.preprocess import load_image

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
  """The first images of the demo set's COCO export (val), with every annotation."""
  root = demo_data.ensure_demo_data(tmp_path_factory.mktemp("demo"), num_train_images=2,
                                    num_val_images=NUM_IMAGES)
  with open(root / demo_data.COCO_FOLDER / "instances_val.json") as f:
    data = json.load(f)
  assert len(data["images"]) == NUM_IMAGES and len(data["annotations"]) > 2 * NUM_IMAGES
  return root, str(root / demo_data.COCO_FOLDER / "instances_val.json"), data


def pipeline_config(root, val_json):
  config = input_pipeline.default_config("released")
  config.data_root = str(root)
  config.datasets = [input_pipeline.dataset_entry("demo_coco", str(root / demo_data.IMAGE_FOLDER),
                                                  kind="json", format="coco",
                                                  files={"val": val_json})]
  config.eval_batch_size = 4
  config.max_targets = 8
  return config


def test_evaluate_gives_pycocotools_ap_of_the_same_predictions(small_coco):
  root, val_json, data = small_coco
  predictor = Predictor.from_pretrained(hmpl.DEMO_SAM3_DIR)
  pipeline = input_pipeline.eval_pipeline(pipeline_config(root, val_json), predictor.config)
  assert pipeline.lengths == {"demo_coco": NUM_IMAGES * len(data["categories"])}
  results = evaluate(predictor.model, pipeline.iterator(), levels=("concept",),
                     datasets=("demo_coco",), ap_datasets=("demo_coco",), log=lambda *_: None)
  ours = results["level=concept/dataset=demo_coco"]
  assert ours["AP_images"] == NUM_IMAGES and ours["AP_images_left_out"] == 0
  assert "box_AP" in format_table(results).splitlines()[0]

  # pycocotools on the annotation file itself and on the predictions of every category's name on
  # every image, one image at a time (all queries: the tiny model has 16 < 100).
  images = [load_image(str(root / demo_data.IMAGE_FOLDER / i["file_name"])) for i in data["images"]]
  names = [c["name"] for c in data["categories"]]
  found = []
  for entry, image in zip(data["images"], images):
    for category, prediction in zip(data["categories"],
                                    predictor.predict_texts([image], names, threshold=0.0)[0]):
      found += coco_results(prediction, entry["id"], entry["file_name"], category["id"],
                            category["name"])
  want = {}
  for prefix, iou_type in coco_ap.IOU_TYPES.items():
    # With a bbox beside the segmentation, loadRes would give segm results the box's area (the
    # small / medium / large ranges); detectron2's evaluator drops it for segm, as coco_ap does.
    drop = "bbox" if iou_type == "segm" else "segmentation"
    with contextlib.redirect_stdout(io.StringIO()):
      truth = COCO(val_json)
      evaluator = COCOeval(truth, truth.loadRes([{k: v for k, v in r.items() if k != drop}
                                                  for r in found]), iou_type)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    want.update({f"{prefix}_{k}": 100 * v
                 for k, v in zip(coco_ap.STATS, evaluator.stats) if v >= 0})
  assert want["mask_AP"] > 5  # a trained model: the comparison is not between zeros
  assert set(want) == {k for k in ours if k.startswith(("box_", "mask_"))}
  for key, value in want.items():
    np.testing.assert_allclose(ours[key], value, atol=1e-6, err_msg=key)


def test_images_not_prompted_with_every_category_are_counted_and_left_out(small_coco):
  _, _, data = small_coco
  accumulator = coco_ap.CocoDetections()
  mask = np.zeros((1, 256, 256), bool)
  mask[0, 10:50, 20:60] = True
  detections = {"scores": np.array([0.9], np.float32), "masks": mask,
                "boxes_xyxy": np.array([[20, 10, 60, 50]], np.float32)}
  annotation = {"id": 1, "counts": mask_utils.encode(np.asfortranarray(mask[0].astype(np.uint8)))
                ["counts"].decode("ascii"), "bbox": [20.0, 10.0, 40.0, 40.0], "iscrowd": False}
  accumulator.add(coco_ap.instances_json(1, 1, 256, 256, [annotation]), detections)
  accumulator.add(coco_ap.instances_json(1, 2, 256, 256, []), detections)
  accumulator.add(coco_ap.instances_json(2, 1, 256, 256, []), detections)  # category 2 missing
  result = accumulator.result()
  assert result["AP_images"] == 1 and result["AP_images_left_out"] == 1
  # Image 1: category 1's detection is its annotation, category 2's a false positive ranked
  # equally; COCO averages AP over the categories with ground truth.
  assert result["mask_AP"] == pytest.approx(100.0) and result["box_AP"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="prompted with category 1 twice"):
    accumulator.add(coco_ap.instances_json(1, 1, 256, 256, [annotation]), detections)
  other = coco_ap.CocoDetections()
  other.merge(accumulator.state())
  assert other.result() == result
