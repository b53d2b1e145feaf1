"""Evaluation metrics on hand-built masks whose IoUs are known by construction."""

import numpy as np
import pytest

from sam3i_jax.evaluation import metrics


def box_mask(y0, y1, x0, x1, size=(10, 10)):
  mask = np.zeros(size, bool)
  mask[y0:y1, x0:x1] = True
  return mask


def test_intersection_union_counts_pixels():
  pred, target = box_mask(0, 4, 0, 5), box_mask(2, 6, 0, 5)  # 20 px each, overlap 10
  assert metrics.intersection_union(pred, target) == (10, 30)
  with pytest.raises(ValueError, match="differ in size"):
    metrics.intersection_union(pred, np.zeros((5, 5), bool))


def test_combine_detections_union_and_top1():
  masks = np.stack([box_mask(0, 2, 0, 2), box_mask(5, 7, 5, 7)])
  scores = np.array([0.6, 0.9])
  union = metrics.combine_detections(masks, scores, "union", (10, 10))
  assert union.sum() == 8 and union[0, 0] and union[6, 6]
  top1 = metrics.combine_detections(masks, scores, "top1", (10, 10))
  assert top1.sum() == 4 and top1[6, 6] and not top1[0, 0]
  empty = metrics.combine_detections(np.zeros((0, 10, 10), bool), np.zeros(0), "union", (10, 10))
  assert empty.shape == (10, 10) and not empty.any()
  with pytest.raises(ValueError, match="combine rule"):
    metrics.combine_detections(masks, scores, "max", (10, 10))
  with pytest.raises(ValueError, match="image size"):
    metrics.combine_detections(masks, scores, "union", (8, 8))


def test_summary_values_and_empty_pair_conventions():
  m = metrics.SegmentationMetrics()
  # IoU 1/3 (I=10, U=30), IoU 1 (I=U=20), a correct negative (empty/empty), a false positive.
  ious = [
      m.add(box_mask(0, 4, 0, 5), box_mask(2, 6, 0, 5), level="simple", subset="1to1"),
      m.add(box_mask(0, 4, 0, 5), box_mask(0, 4, 0, 5), level="simple", subset="1toN"),
      m.add(np.zeros((10, 10), bool), np.zeros((10, 10), bool), level="complex", subset="1to1"),
      m.add(box_mask(0, 1, 0, 5), np.zeros((10, 10), bool), level="complex", subset="1to1"),
  ]
  np.testing.assert_allclose(ious, [1 / 3, 1.0, 0.0, 0.0])
  res = m.result()
  overall = res["all"]
  assert overall["count"] == 4
  np.testing.assert_allclose(overall["gIoU"], 100 * (1 / 3 + 1) / 4)
  # LISA: I / (U + 1e-5), +1 for the empty/empty pair.
  lisa = (10 / (30 + 1e-5) + 20 / (20 + 1e-5) + 1.0 + 0.0) / 4
  np.testing.assert_allclose(overall["gIoU_lisa"], 100 * lisa)
  np.testing.assert_allclose(overall["cIoU"], 100 * (10 + 20) / (30 + 20 + 0 + 5))
  np.testing.assert_allclose(overall["P@0.5"], 25.0)
  np.testing.assert_allclose(res["level=simple"]["gIoU"], 100 * (1 / 3 + 1) / 2)
  np.testing.assert_allclose(res["level=complex"]["gIoU"], 0.0)
  np.testing.assert_allclose(res["level=complex"]["gIoU_lisa"], 50.0)
  np.testing.assert_allclose(res["subset=1to1"]["P@0.5"], 0.0)
  assert res["level=simple/subset=1toN"] == {"count": 1, "gIoU": 100.0,
                                             "gIoU_lisa": pytest.approx(100 * 20 / (20 + 1e-5)),
                                             "cIoU": 100.0, "P@0.5": 100.0}
  assert res["level=complex/subset=1to1"]["count"] == 2


def test_group_with_only_empty_pairs_has_zero_ciou():
  m = metrics.SegmentationMetrics(cross=None)
  m.add(np.zeros((3, 3), bool), np.zeros((3, 3), bool), level="concept")
  res = m.result()
  assert res["all"]["cIoU"] == 0.0 and res["all"]["gIoU"] == 0.0
  assert res["all"]["gIoU_lisa"] == 100.0
  assert set(res) == {"all", "level=concept"}


def test_add_counts_rejects_impossible_counts():
  with pytest.raises(ValueError, match="intersection <= union"):
    metrics.SegmentationMetrics().add_counts(5, 3)
