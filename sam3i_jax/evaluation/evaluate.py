"""Evaluation of a model on an eval pipeline, per instruction level, as SAM3-I evaluates.

For each sample and level: one forward pass (jit-compiled per level), post-processing as
docs/design.md §2.8 (score = sigmoid(logit) * sigmoid(presence) > threshold, SAM 3.1: the logit
alone; masks resized to the original image), the kept masks combined by the `union` (HMPL,
Ref-ZOM) or `top1` (RefCOCO) rule, compared with the OR of all the datapoint's annotations,
leaving out the datapoint's ignore region if it has one (ReasonSeg's, as LISA evaluates). Metrics
(`sam3i_jax.evaluation.metrics`) per level, per dataset (subset), per kind (object / part, the
paper's breakdown, the reader's rule in `input_pipeline.hmpl`; ReasonSeg's short / long queries),
per level x dataset and per level x kind. Samples of
unknown kind (files without categories, RefCOCO-style sets) count in every group but the kind
ones. With several processes, each evaluates its share and the per-sample rows are gathered
before the metrics are computed.

COCO-style datasets (`ap_datasets`: every category prompted on every image) also get COCO box and
mask AP per level (`sam3i_jax.evaluation.coco_ap`), in their level x dataset group.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import pycocotools.mask as mask_utils
from flax import nnx

from sam3i_jax import visualize
from sam3i_jax.evaluation import coco_ap
from sam3i_jax.evaluation import metrics as metrics_lib
from sam3i_jax.evaluation.postprocess import postprocess
from sam3i_jax.preprocess import denormalize

HOST_KEY = "text"  # input_pipeline.transforms.HOST_KEY (not imported: the package stays light)
# What the readers give: input_pipeline.hmpl.category_kind (object / part; InstructPart: part)
# and ReasonSeg's query length (short / long). "" = unknown.
TARGET_KINDS = ("object", "part", "short", "long")
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit")
# One gathered row per sample and level: counts, then indices into levels / datasets / kinds.
ROW_COLUMNS = ("intersection", "union", "level", "dataset", "kind")


@functools.partial(jax.jit, static_argnames=("graphdef", "level"))
def _forward(graphdef, state, images, tokens, level):
  model = nnx.merge(graphdef, state)
  outputs = model(images, tokens, level=level)
  return {key: outputs[key] for key in OUTPUT_KEYS}


def decode_ground_truth(rle: str, height: int, width: int) -> np.ndarray:
  return mask_utils.decode({"size": [int(height), int(width)],
                           "counts": str(rle).encode("ascii")}).astype(bool)


def _allgather_ragged(local: np.ndarray) -> list[np.ndarray]:
  """Every process's `local` (first axes of any length, the others equal), in process order."""
  if jax.process_count() == 1:
    return [local]
  from jax.experimental import multihost_utils
  counts = multihost_utils.process_allgather(np.asarray([len(local)]))
  padded = np.zeros((int(counts.max()), *local.shape[1:]), local.dtype)
  padded[:len(local)] = local
  gathered = multihost_utils.process_allgather(padded)
  return [g[:int(n)] for g, n in zip(gathered, counts.reshape(-1))]


def _gather_samples(rows: list[tuple[int, ...]]) -> np.ndarray:
  """(N, len(ROW_COLUMNS)) int64: the rows of every process."""
  local = np.asarray(rows, np.int64).reshape(-1, len(ROW_COLUMNS))
  return np.concatenate(_allgather_ragged(local))


def _gather_json(value: Any) -> list[Any]:
  """`value` (JSON-able) of every process, in process order."""
  local = np.frombuffer(json.dumps(value).encode(), np.uint8)
  return [json.loads(part.tobytes()) for part in _allgather_ragged(local)]


def _kind_index(kind: str) -> int:
  """0 for an unknown kind (""), else 1 + its index in TARGET_KINDS."""
  if kind and kind not in TARGET_KINDS:
    raise ValueError(f"target kind {kind!r} is not one of {TARGET_KINDS} or ''")
  return TARGET_KINDS.index(kind) + 1 if kind else 0


def evaluate(model: nnx.Module, batches: Iterable[dict[str, Any]], *, levels: Sequence[str],
             combine: metrics_lib.CombineRule = "union", threshold: float = 0.5,
             datasets: Sequence[str] = (), to_device: Callable[[dict], dict] | None = None,
             from_device: Callable[[Any], Any] = jax.device_get,
             image_dir: str | None = None, num_images: int = 0,
             ap_datasets: Sequence[str] = (), ap_max_detections: int = 100,
             log: Callable[[str], Any] = print) -> dict[str, dict[str, float]]:
  """-> metrics by group: "all", "level=simple", "dataset=...", "kind=object" (each of
  TARGET_KINDS), "level=.../dataset=..." and "level=.../kind=...". Samples of unknown kind ("") are in no kind
  group; a kind that no sample has gives no group.

  batches: eval batches of the input pipeline (with the host strings, dataset name and target
    kind under "text"; padding examples have example_valid False). `datasets`: the dataset
    names, in a fixed order shared by all processes (they index the gathered rows).
    `to_device`: turns a host batch's arrays into (global) device arrays; None = as they are.
    `from_device`: the model outputs -> this process's rows as numpy (multi-host:
    `multihost_utils.global_array_to_host_local_array`). `image_dir`, `num_images`: PNG
    overlays of the first predictions per level (process 0 only). `ap_datasets`: the names of
    COCO-style datasets, which also get COCO AP (`ap_max_detections` per prompt) in their
    "level=.../dataset=..." groups (`coco_ap.CocoDetections.result`).
  """
  model.eval()
  graphdef, state = nnx.split(model)
  dataset_index = {name: i for i, name in enumerate(datasets)}
  rows: list[tuple[int, ...]] = []
  drawn = {level: 0 for level in levels}
  detections_for_ap = {(level, name): coco_ap.CocoDetections()
                       for level in levels for name in ap_datasets}
  start, seen = time.time(), 0
  for batch_number, batch in enumerate(batches):
    host = batch[HOST_KEY]
    arrays = {k: v for k, v in batch.items() if k != HOST_KEY}
    device = to_device(arrays) if to_device else arrays
    valid = np.flatnonzero(np.asarray(batch["example_valid"]))
    for level_number, level in enumerate(levels):
      outputs = from_device(_forward(graphdef, state, device["image"],
                                     device[f"tokens_{level}"], level))
      outputs = {k: np.asarray(v)[:len(batch["example_valid"])] for k, v in outputs.items()}
      for i in valid:
        height, width = (int(v) for v in batch["orig_size"][i])
        detections = postprocess(*(outputs[k][i] for k in OUTPUT_KEYS), (height, width),
                                 threshold, presence_in_logits=model.config.joint_presence_scores)
        prediction = metrics_lib.combine_detections(detections["masks"], detections["scores"],
                                                     combine, (height, width))
        target = decode_ground_truth(host["ground_truth"][i], height, width)
        ignore = str(host["ignore"][i])
        inter, union = metrics_lib.intersection_union(
            prediction, target, decode_ground_truth(ignore, height, width) if ignore else None)
        name = str(host["dataset"][i])
        if (level, name) in detections_for_ap:
          detections_for_ap[level, name].add(str(host["instances"][i]), postprocess(
              *(outputs[k][i] for k in OUTPUT_KEYS), (height, width), 0.0,
              presence_in_logits=model.config.joint_presence_scores,
              max_detections=ap_max_detections))
        if name not in dataset_index:
          dataset_index[name] = len(dataset_index)
        rows.append((inter, union, level_number, dataset_index[name],
                     _kind_index(str(host["kind"][i]))))
        if image_dir and drawn[level] < num_images and jax.process_index() == 0:
          _draw(image_dir, level, str(host[level][i]), batch["image"][i], (height, width),
                detections, int(batch["datapoint_id"][i]))
          drawn[level] += 1
    seen += len(valid)
    if (batch_number + 1) % 10 == 0:
      log(f"  eval: {batch_number + 1} batches, {seen} samples, "
          f"{seen / (time.time() - start):.1f} samples/s")
  names = {i: n for n, i in dataset_index.items()}
  accumulator = metrics_lib.SegmentationMetrics(crosses=(("level", "dataset"), ("level", "kind")))
  for inter, union, level_number, dataset, kind in _gather_samples(rows):
    tags = {"level": levels[int(level_number)], "dataset": names.get(int(dataset), str(dataset))}
    if kind:
      tags["kind"] = TARGET_KINDS[int(kind) - 1]
    accumulator.add_counts(int(inter), int(union), **tags)
  results = accumulator.result()
  for (level, name), detections in detections_for_ap.items():
    gathered = coco_ap.CocoDetections()
    for state in _gather_json(detections.state()):
      gathered.merge(state)
    group = results.setdefault(f"level={level}/dataset={name}", {"count": 0})
    group.update(gathered.result())
    if group["AP_images_left_out"]:
      log(f"COCO AP of {name} at the {level} level: {group['AP_images_left_out']} image(s) not "
          f"prompted with all {len(gathered.categories)} categories are left out (an evaluation "
          f"cut short by max_batches, or a split read with negatives < 1); "
          f"{group['AP_images']} measured")
  return results


def _draw(image_dir: str, level: str, text: str, image: np.ndarray, size: tuple[int, int],
          detections: dict[str, np.ndarray], datapoint_id: int) -> None:
  """The prediction over the (resized back) input image, with the instruction as its title."""
  from PIL import Image, ImageDraw

  height, width = size
  picture = Image.fromarray(denormalize(np.asarray(image))).resize((width, height),
                                                                   Image.BILINEAR)
  overlay = visualize.draw(np.asarray(picture), detections["boxes_xyxy"], detections["scores"],
                           detections["masks"])
  titled = Image.new("RGB", (width, height + 18), "white")
  titled.paste(overlay, (0, 18))
  ImageDraw.Draw(titled).text((4, 3), f"[{level}] {text}", fill="black")
  os.makedirs(image_dir, exist_ok=True)
  titled.save(os.path.join(image_dir, f"{level}_{datapoint_id}.png"))


def format_table(results: dict[str, dict[str, float]], keys: Sequence[str] = (
    "gIoU", "cIoU", "P@0.5", "gIoU_lisa"), ap_keys: Sequence[str] = ("box_AP", "mask_AP")) -> str:
  """One row per group; the COCO AP columns only when some group has them ("-": not measured)."""
  keys = [*keys, *(k for k in ap_keys if any(k in values for values in results.values()))]
  width = max(len(group) for group in results)
  lines = [f"{'group':<{width}}  {'count':>6}  " + "  ".join(f"{k:>9}" for k in keys)]
  for group, values in results.items():
    lines.append(f"{group:<{width}}  {values['count']:>6}  " + "  ".join(
        f"{values[k]:>9.2f}" if k in values else f"{'-':>9}" for k in keys))
  return "\n".join(lines)
