"""COCO box and mask AP (pycocotools' COCOeval) of prompted detections, as SAM 3 evaluates
COCO-style sets: every category of an image is prompted with its name, and each prompt's
detections are results of that category.

The ground truth travels with the evaluated samples (`instances_json`: the prompt's image,
category and annotations), so JSON files, ArrayRecord shards and any number of processes give the
same numbers; an image's ground truth is the union of its samples' annotations, so the images must
be prompted with every category (the COCO reader's `negatives=1`) for the AP to be COCO's. Each
prompt contributes the detections post-processing gives it (evaluation keeps the 100
best-scoring queries, unthresholded, as COCOeval keeps 100 per image and category), boxes in
pixels and masks at the image's size.

Reported, in percent: {box,mask}_{AP,AP50,AP75,APs,APm,APl} (COCOeval.stats[:6]), over the images
prompted with every category (`AP_images`; the others are counted in `AP_images_left_out`). An
annotation's area, which the small / medium / large ranges read, is its mask's pixel count.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6]
IOU_TYPES = {"box": "bbox", "mask": "segm"}


def instances_json(image_id: int, category_id: int, height: int, width: int,
                   annotations: list[dict[str, Any]]) -> str:
  """One prompt's ground truth as the string that travels with the sample.

  annotations: {"id", "counts" (compressed RLE string at (height, width)), "bbox" [x, y, w, h]
  pixels, "iscrowd"} of the prompted category on the image (none for an absent category).
  """
  return json.dumps({"image_id": int(image_id), "category_id": int(category_id),
                     "height": int(height), "width": int(width), "annotations": annotations},
                    separators=(",", ":"))


def detection_results(scores: np.ndarray, boxes_xyxy: np.ndarray, masks: np.ndarray,
                      image_id: int, category_id: int) -> list[dict[str, Any]]:
  """Post-processed detections of one prompt as COCO result entries: image_id, category_id,
  score, bbox [x, y, w, h] pixels and segmentation (compressed RLE at the masks' size)."""
  entries = []
  for score, (x0, y0, x1, y1), mask in zip(np.asarray(scores).tolist(),
                                           np.asarray(boxes_xyxy).tolist(), masks):
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    entries.append({"image_id": int(image_id), "category_id": int(category_id), "score": score,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": {"size": [int(v) for v in rle["size"]],
                                     "counts": rle["counts"].decode("ascii")}})
  return entries


class CocoDetections:
  """Ground truth and detections of prompted (image, category) samples; `result()` -> AP."""

  def __init__(self):
    self.images: dict[int, tuple[int, int]] = {}
    self.annotations: dict[int, dict[str, Any]] = {}  # by annotation id
    self.categories: set[int] = set()
    self.prompted: set[tuple[int, int]] = set()
    self.results: list[dict[str, Any]] = []

  def add(self, instances: str, detections: dict[str, np.ndarray]) -> None:
    """One sample: its `instances_json` and its post-processed detections (scores,
    boxes_xyxy, masks at the image's size), every one of which is a result."""
    sample = json.loads(instances)
    image, category = sample["image_id"], sample["category_id"]
    if (image, category) in self.prompted:
      raise ValueError(f"image {image} was prompted with category {category} twice")
    self.prompted.add((image, category))
    size = (sample["height"], sample["width"])
    if self.images.setdefault(image, size) != size:
      raise ValueError(f"image {image}: size {size} differs from {self.images[image]} seen before")
    self.categories.add(category)
    for ann in sample["annotations"]:
      self.annotations[ann["id"]] = {**ann, "image_id": image, "category_id": category}
    self.results += detection_results(detections["scores"], detections["boxes_xyxy"],
                                      detections["masks"], image, category)

  def state(self) -> dict[str, Any]:
    """Everything added, as JSON-able lists (to gather from several processes)."""
    return {"images": sorted([i, *hw] for i, hw in self.images.items()),
            "annotations": list(self.annotations.values()), "categories": sorted(self.categories),
            "prompted": sorted(map(list, self.prompted)), "results": self.results}

  def merge(self, state: dict[str, Any]) -> None:
    for image, height, width in state["images"]:
      if self.images.setdefault(image, (height, width)) != (height, width):
        raise ValueError(f"image {image}: sizes differ between processes")
    for ann in state["annotations"]:
      self.annotations[ann["id"]] = ann
    self.categories.update(state["categories"])
    for image, category in state["prompted"]:
      if (image, category) in self.prompted:
        raise ValueError(f"image {image} was prompted with category {category} twice")
      self.prompted.add((image, category))
    self.results.extend(state["results"])

  def result(self) -> dict[str, float]:
    """{box,mask}_{AP,...} in percent over the images prompted with every category seen, and
    `AP_images`, their count; `AP_images_left_out` counts the others (an evaluation cut short, or
    a split read with negatives < 1), which are not measured. A statistic without ground truth
    to measure (COCOeval's -1, e.g. APs on a set without small objects) is left out."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    prompts = collections.Counter(image for image, _ in self.prompted)
    complete = {i for i, n in prompts.items() if n == len(self.categories)}
    numbers = {"AP_images": len(complete), "AP_images_left_out": len(self.images) - len(complete)}
    if not complete:
      return numbers
    for prefix, iou_type in IOU_TYPES.items():
      with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        truth = COCO()
        truth.dataset = self._dataset(iou_type, complete)
        truth.createIndex()
        results = self._results(iou_type, complete)
        found = truth.loadRes(results) if results else _empty(truth)
        evaluator = COCOeval(truth, found, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
      numbers.update({f"{prefix}_{name}": 100.0 * float(v)
                      for name, v in zip(STATS, evaluator.stats) if v >= 0})
    return numbers

  def _dataset(self, iou_type: str, images: set[int]) -> dict[str, Any]:
    annotations = []
    for ann in sorted(self.annotations.values(), key=lambda a: a["id"]):
      if ann["image_id"] not in images:
        continue
      height, width = self.images[ann["image_id"]]
      rle = {"size": [height, width], "counts": ann["counts"]}
      annotations.append({"id": ann["id"], "image_id": ann["image_id"],
                          "category_id": ann["category_id"], "iscrowd": int(ann["iscrowd"]),
                          "bbox": ann["bbox"], "area": float(mask_utils.area(rle)),
                          **({"segmentation": rle} if iou_type == "segm" else {})})
    return {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in self.images.items()
                       if i in images],
            "categories": [{"id": c} for c in sorted(self.categories)],
            "annotations": annotations}

  def _results(self, iou_type: str, images: set[int]) -> list[dict[str, Any]]:
    # segm results without the box: with one, pycocotools would give the mask the box's area.
    other = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in r.items() if k != other} for r in self.results
            if r["image_id"] in images]


def _empty(truth):
  """No detections at all: a results set with the ground truth's images and categories."""
  from pycocotools.coco import COCO
  found = COCO()
  found.dataset = {"images": truth.dataset["images"], "categories": truth.dataset["categories"],
                   "annotations": []}
  found.createIndex()
  return found
