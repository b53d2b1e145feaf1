"""Evaluation metrics and grouping on hand-built masks whose IoUs are known by construction."""

import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from flax import nnx

from input_pipeline import hmpl, instructpart, reasonseg
from sam3i_jax.evaluation import evaluate as evaluate_lib
from sam3i_jax.evaluation import metrics
from sam3i_jax.models.config import get_preset


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
  m = metrics.SegmentationMetrics(crosses=())
  m.add(np.zeros((3, 3), bool), np.zeros((3, 3), bool), level="concept")
  res = m.result()
  assert res["all"]["cIoU"] == 0.0 and res["all"]["gIoU"] == 0.0
  assert res["all"]["gIoU_lisa"] == 100.0
  assert set(res) == {"all", "level=concept"}


def test_add_counts_rejects_impossible_counts():
  with pytest.raises(ValueError, match="intersection <= union"):
    metrics.SegmentationMetrics().add_counts(5, 3)


class _DrawnMasks(nnx.Module):
  """One query, always kept, whose mask logits are the image's first channel at level "simple"
  and negative everywhere at "complex": the test draws the predictions into the images.
  With presence -10 the query is kept only by a model whose logits carry the presence score
  (SAM 3.1's joint_presence_scores), which scores by the logit alone."""

  def __init__(self, presence: float = 10.0, joint_presence_scores: bool = False):
    self.presence = presence
    self.config = get_preset("tiny", variant="sam3.1" if joint_presence_scores else "sam3")

  def __call__(self, images, tokens, level):
    b = images.shape[0]
    logits = images[..., 0] if level == "simple" else -jnp.ones(images.shape[:3])
    return {"pred_logits": jnp.full((b, 1, 1), 10.0), "pred_boxes": jnp.full((b, 1, 4), 0.5),
            "pred_masks": logits[:, None], "presence_logit": jnp.full((b, 1), self.presence)}


def _eval_batch():
  """4 samples (and a padding example) with known counts at level "simple":
  object in A: I=10, U=30; object in B: I=U=20; part in A: I=10, U=20; unknown kind in A: I=0,
  U=20. At level "complex" nothing is predicted, so I=0, U=20 for each."""
  gt = [box_mask(2, 6, 0, 5), box_mask(0, 4, 0, 5), box_mask(0, 4, 0, 5), box_mask(0, 4, 0, 5),
        box_mask(0, 4, 0, 5)]
  pred = [box_mask(0, 4, 0, 5), box_mask(0, 4, 0, 5), box_mask(0, 2, 0, 5),
          np.zeros((10, 10), bool), np.ones((10, 10), bool)]
  image = np.zeros((5, 10, 10, 3), np.float32)
  image[..., 0] = np.where(np.stack(pred), 1.0, -1.0)
  rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode("ascii")
          for m in gt]
  tokens = np.ones((5, 4), np.int32)
  return {
      "image": image, "tokens_simple": tokens, "tokens_complex": tokens,
      "orig_size": np.full((5, 2), 10, np.int32), "datapoint_id": np.arange(5, dtype=np.int64),
      "example_valid": np.array([True, True, True, True, False]),
      "text": {"dataset": np.array(["A", "B", "A", "A", ""]),
               "kind": np.array(["object", "object", "part", "", ""]),
               "ground_truth": np.array(rles), "ignore": np.array([""] * 5, dtype=object),
               "simple": np.array(["s"] * 5),
               "complex": np.array(["c"] * 5)}}


def test_evaluate_groups_by_kind_and_level_with_known_values():
  results = evaluate_lib.evaluate(_DrawnMasks(), [_eval_batch()], levels=("simple", "complex"),
                                  datasets=("A", "B"), log=lambda _: None)
  expected = {  # (count, gIoU, cIoU) from the counts in _eval_batch
      "all": (8, 100 * (1 / 3 + 1 + 1 / 2) / 8, 100 * 40 / 170),
      "kind=object": (4, 100 * (1 / 3 + 1) / 4, 100 * 30 / 90),
      "kind=part": (2, 100 * (1 / 2) / 2, 100 * 10 / 40),
      "level=simple/kind=object": (2, 100 * (1 / 3 + 1) / 2, 100 * 30 / 50),
      "level=simple/kind=part": (1, 50.0, 50.0),
      "level=complex/kind=object": (2, 0.0, 0.0),
      "level=complex/kind=part": (1, 0.0, 0.0),
      "level=simple/dataset=A": (3, 100 * (1 / 3 + 1 / 2) / 3, 100 * 20 / 70),
      "dataset=B": (2, 100 * 1 / 2, 100 * 20 / 40),
  }
  for group, (count, giou, ciou) in expected.items():
    assert results[group]["count"] == count, group
    np.testing.assert_allclose(results[group]["gIoU"], giou, err_msg=group)
    np.testing.assert_allclose(results[group]["cIoU"], ciou, err_msg=group)
  assert results["level=simple/kind=part"]["P@0.5"] == 100.0
  # the unknown kind gives no group; every group is one of the documented forms
  kinds = {g for g in results if "kind=" in g}
  assert kinds == {f"{p}kind={k}" for p in ("", "level=simple/", "level=complex/")
                   for k in ("object", "part")}
  table = evaluate_lib.format_table(results).splitlines()
  assert next(line for line in table if line.startswith("kind=part ")).split() == [
      "kind=part", "2", "25.00", "25.00", "50.00", "25.00"]
  assert len(table) == len(results) + 1


@pytest.mark.parametrize("joint", [False, True])
def test_evaluate_scores_as_the_model_variant_does(joint):
  """An absent-concept presence score (-10) keeps nothing under SAM 3's scoring; SAM 3.1's logits
  already carry it, so the query's own logit (10) decides."""
  results = evaluate_lib.evaluate(_DrawnMasks(presence=-10.0, joint_presence_scores=joint),
                                  [_eval_batch()], levels=("simple",), log=lambda _: None)
  np.testing.assert_allclose(results["all"]["gIoU"], 100 * (1 / 3 + 1 + 1 / 2) / 4 if joint else 0.0)


def test_evaluate_leaves_the_ignore_region_out():
  """Sample 0 (level simple) with its top two rows ignored: the prediction's half there no longer
  counts, I = 10, U = 20 instead of 30."""
  batch = _eval_batch()
  ignore = mask_utils.encode(np.asfortranarray(box_mask(0, 2, 0, 10).astype(np.uint8)))
  batch["text"]["ignore"][0] = ignore["counts"].decode("ascii")
  results = evaluate_lib.evaluate(_DrawnMasks(), [batch], levels=("simple",), log=lambda _: None)
  group = results["level=simple/kind=object"]
  np.testing.assert_allclose(group["gIoU"], 100 * (1 / 2 + 1) / 2)
  np.testing.assert_allclose(group["cIoU"], 100 * 30 / 40)


def test_evaluate_knows_every_kind_the_readers_give():
  reader_kinds = {hmpl.category_kind(name) for name in ("mug", "mug:handle")}
  reader_kinds |= {instructpart.TARGET_KIND, *reasonseg.QUERY_KINDS.values()}
  assert reader_kinds == set(evaluate_lib.TARGET_KINDS)


def test_evaluate_rejects_an_unknown_kind_name():
  batch = _eval_batch()
  batch["text"]["kind"][0] = "piece"
  with pytest.raises(ValueError, match="'piece'"):
    evaluate_lib.evaluate(_DrawnMasks(), [batch], levels=("simple",), log=lambda _: None)
