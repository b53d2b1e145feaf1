"""SAM 3 detection/segmentation losses: parity with sam3==0.1.4's loss classes (Triton off), as
SAM3-I's base.yaml configures them, per term and in gradient; replica averaging; negatives."""

import functools

import parity  # first: CPU workarounds (incl. a torch Triton focal-loss module) before sam3

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from sam3.model.model_misc import SAM3Output
from sam3.train.loss import loss_fns, sam3_loss
from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

from sam3i_jax.box_ops import box_cxcywh_to_xyxy
from sam3i_jax.losses import detection, functional
from sam3i_jax.losses.detection import DetectionTargets, detection_loss
from sam3i_jax.resize import resize_bool_masks
from sam3i_jax.models.config import get_preset
from sam3i_jax.models.sam3 import abstract_model

B, Q, T, M, LAYERS = 4, 16, 5, 12, 3  # prompts, queries, GT slots, mask size, decoder layers
RTOL = 1e-5
# the reference's metrics and its always-zero terms, which detection_loss does not return
REFERENCE_ONLY = ("ce_f1", "presence_dec_acc", "presence_acc", "miou_semantic_seg",
                  "loss_semantic_presence", "core_loss")


# ---------------------------------------------------------------------------------- inputs

def _boxes(rng, shape, lo=0.05, hi=0.4):
  centre = rng.uniform(0.25, 0.75, shape + (2,))
  return np.concatenate([centre, rng.uniform(lo, hi, shape + (2,))], -1).astype(np.float32)


def _near(rng, gt, valid, shape):
  """Predicted cxcywh boxes jittered around valid GT boxes (so o2m matches happen)."""
  out = _boxes(rng, shape)
  for b in range(shape[0]):
    slots = np.flatnonzero(valid[b])
    for q in range(shape[1] // 2 if len(slots) else 0):
      box = gt[b, slots[q % len(slots)]].copy()
      box[:2] += rng.normal(0, 0.01, 2)
      box[2:] = np.maximum(box[2:], 0.05) * rng.uniform(0.85, 1.15, 2)
      out[b, q] = box
  return out


def make_batch(seed, negatives_only=False):
  """Our outputs (numpy) and DetectionTargets for a batch with every case the loss handles:
  a full prompt with two near-identical GT boxes (an o2m query matched twice), a partial prompt
  with non-prefix padding, a negative prompt, and a prompt whose only GT box has zero width
  (no visible box) and an empty mask. Padded slots hold garbage."""
  rng = np.random.default_rng(seed)
  gt = _boxes(rng, (B, T))
  valid = np.zeros((B, T), bool)
  if not negatives_only:
    valid[0] = True
    gt[0, 3] = gt[0, 0] + np.float32([0.003, -0.002, 0.004, 0.0])
    valid[1, [1, 4]] = True
    valid[3, 2] = True
    gt[3, 2, 2] = 0.0
  masks = rng.uniform(size=(B, T, M, M)) < 0.3
  masks[3, 2] = False
  gt[~valid] = rng.normal(size=(int((~valid).sum()), 4)) * 9  # garbage must not matter

  def layer(num_queries):
    boxes = _near(rng, gt, valid, (B, num_queries))
    return {"pred_logits": rng.normal(0, 2, (B, num_queries, 1)).astype(np.float32),
            "pred_boxes": boxes, "pred_boxes_xyxy": np.asarray(box_cxcywh_to_xyxy(boxes))}

  layers = [layer(Q) for _ in range(LAYERS)]
  layers_o2m = [{f"{k}_o2m": v for k, v in layer(Q).items()} for _ in range(LAYERS)]
  outputs = {**layers[-1], **layers_o2m[-1],
             "pred_masks": rng.normal(0, 3, (B, Q, M, M)).astype(np.float32),
             "pred_masks_o2m": rng.normal(0, 3, (B, Q, M, M)).astype(np.float32),
             "semantic_seg": rng.normal(0, 3, (B, 1, M, M)).astype(np.float32),
             "presence_logit": rng.normal(0, 2, (B, 1)).astype(np.float32),
             "aux_outputs": [{**l, "presence_logit": rng.normal(0, 2, (B, 1)).astype(np.float32)}
                             for l in layers[:-1]],
             "aux_outputs_o2m": layers_o2m[:-1]}
  return outputs, DetectionTargets(gt, valid, masks)


@functools.lru_cache(maxsize=None)
def _loss_and_grad(num_replicas):
  def fn(outputs, targets):
    return detection_loss(outputs, targets, num_replicas=num_replicas)
  return jax.jit(jax.value_and_grad(fn, has_aux=True), compiler_options=parity.FAST_COMPILE)


# ------------------------------------------------------------------------------- reference

def _reference_wrapper():
  """Sam3LossWrapper with the loss classes and matchers as SAM3-I's base.yaml builds them."""
  return sam3_loss.Sam3LossWrapper(
    loss_fns_find=[
      loss_fns.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
      loss_fns.IABCEMdetr(weak_loss=False, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0},
                          pos_weight=10.0, alpha=0.25, gamma=2, use_presence=True,
                          pos_focal=False, pad_n_queries=200, pad_scale_pos=1.0),
      loss_fns.Masks(focal_alpha=0.25, focal_gamma=2.0,
                     weight_dict={"loss_mask": 200.0, "loss_dice": 10.0}, compute_aux=False)],
    matcher=_reference_matcher(),
    o2m_matcher=BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4),
    o2m_weight=2.0, use_o2m_matcher_on_o2m_aux=False,
    loss_fn_semantic_seg=loss_fns.SemanticSegCriterion(
      presence_head=True, presence_loss=False, focal=True, focal_alpha=0.6, focal_gamma=2.0,
      downsample=False, weight_dict={"loss_semantic_seg": 20.0, "loss_semantic_presence": 1.0,
                                     "loss_semantic_dice": 30.0}),
    scale_by_find_batch_size=True)


def _reference_matcher():
  return BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                  alpha=0.25, gamma=2, stable=False)


@pytest.fixture
def reference(monkeypatch):
  """(outputs, targets, total_boxes, world_size) -> (terms, leaves): the reference loss of one
  replica, with Triton switched off and torch.distributed replaced by the given global count."""
  monkeypatch.setattr(loss_fns, "sigmoid_focal_loss",
                      functools.partial(loss_fns.sigmoid_focal_loss, triton=False))

  def run(outputs, targets, total_boxes, world_size):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.fill_(total_boxes))
    monkeypatch.setattr(sam3_loss, "get_world_size", lambda: world_size)
    out, leaves = _torch_outputs(outputs)
    tg = _torch_targets(targets)
    matcher = _reference_matcher()
    out["indices"] = matcher(out, tg)
    for aux in out["aux_outputs"]:
      aux["indices"] = matcher(aux, tg)
    losses = _reference_wrapper()(SAM3Output([[out]]), [tg])
    return losses, leaves

  return run


def _torch_outputs(outputs):
  """Our output structure -> the reference's (o2m keys inside each layer's dict, presence as
  presence_logit_dec), every array a leaf tensor that records its gradient."""
  leaves = {}

  def leaf(name, value):
    leaves[name] = torch.tensor(np.asarray(value), requires_grad=True)
    return leaves[name]

  top = {k: leaf(k, v) for k, v in outputs.items() if not k.startswith("aux_")}
  top["presence_logit_dec"] = top["presence_logit"]
  aux = []
  for i, (layer, layer_o2m) in enumerate(zip(outputs["aux_outputs"], outputs["aux_outputs_o2m"])):
    entry = {k: leaf(f"aux_{i}/{k}", v) for k, v in {**layer, **layer_o2m}.items()}
    entry["presence_logit_dec"] = entry.pop("presence_logit")
    aux.append(entry)
  top["aux_outputs"] = aux
  return top, leaves


def _torch_targets(targets: DetectionTargets):
  """Packed BatchedFindTarget fields, as Sam3Image.back_convert hands them to the loss."""
  valid = np.asarray(targets.target_valid)
  boxes = torch.tensor(np.asarray(targets.boxes)[valid])
  num_boxes = torch.tensor(valid.sum(1))
  padded = np.zeros((len(valid), int(valid.sum(1).max()), 4), np.float32)
  ids_padded = -np.ones(padded.shape[:2], np.int64)
  for b in range(len(valid)):
    n = valid[b].sum()
    padded[b, :n] = np.asarray(targets.boxes)[b, valid[b]]
    ids_padded[b, :n] = np.arange(n)
  return {"boxes": boxes, "boxes_xyxy": torch.tensor(np.asarray(box_cxcywh_to_xyxy(boxes.numpy()))),
          "boxes_padded": torch.tensor(padded), "num_boxes": num_boxes,
          "masks": torch.tensor(np.asarray(targets.masks)[valid]),
          "semantic_masks": torch.zeros(0, dtype=torch.bool),
          "is_valid_mask": torch.ones(len(boxes), dtype=torch.bool),
          "is_exhaustive": torch.ones(len(valid), dtype=torch.bool),
          "object_ids_padded": torch.tensor(ids_padded),
          "object_ids_packed": torch.tensor(ids_padded[ids_padded >= 0])}


def _scalar(v):
  return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _compare_terms(ours, reference_terms):
  """Our terms against the reference's, which also holds metrics and always-zero terms."""
  expected = {k: v for k, v in reference_terms.items() if not k.startswith(REFERENCE_ONLY)
              and not (k.startswith("presence_loss") and k.endswith("_o2m"))}
  assert set(ours) == set(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(float(ours[k]), v, rtol=RTOL, atol=1e-8, err_msg=k)


def _rel_l2(a, b):
  return np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30)


def _our_grads_by_name(grads):
  flat = {k: v for k, v in grads.items() if not k.startswith("aux_")}
  for i, (layer, layer_o2m) in enumerate(zip(grads["aux_outputs"], grads["aux_outputs_o2m"])):
    flat.update({f"aux_{i}/{k}": v for k, v in {**layer, **layer_o2m}.items()})
  return flat


# ----------------------------------------------------------------------------------- tests

def test_functional_matches_torch():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 4, (3, 50)).astype(np.float32)
  y = (rng.uniform(size=(3, 50)) < 0.4).astype(np.float32)
  soft = rng.uniform(size=(3, 50)).astype(np.float32)
  tx, ty, ts = map(torch.tensor, (x, y, soft))
  np.testing.assert_allclose(
    functional.binary_cross_entropy_with_logits(x, soft, pos_weight=10.0),
    F.binary_cross_entropy_with_logits(tx, ts, pos_weight=torch.tensor(10.0), reduction="none"),
    rtol=1e-6, atol=1e-6)
  for alpha, gamma in ((0.25, 2), (0.6, 2.0), (0.5, 0), (-1, 1.5)):
    np.testing.assert_allclose(
      functional.sigmoid_focal_loss(x, y, alpha, gamma),
      loss_fns.sigmoid_focal_loss(tx, ty, 1, alpha=alpha, gamma=gamma, reduce=False,
                                  triton=False), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(functional.dice_loss(x, y),
                             loss_fns.dice_loss(tx, ty, 1, reduce=False), rtol=1e-6)
  # gamma 0 is an integer power: finite gradient where p_t = 1 (a float 0.0 power gives NaN)
  grad = jax.grad(lambda v: functional.sigmoid_focal_loss(v, 1.0, 0.5, 0.0).sum())(
    jnp.float32([200.0, -3.0]))
  assert np.isfinite(grad).all()


@pytest.mark.parametrize("shape,size", [((2, 3, 1008, 1008), (288, 288)), ((1, 37, 61), (16, 9)),
                                        ((2, 7, 9), (20, 31))])
def test_resize_bool_masks_matches_torch(shape, size):
  rng = np.random.default_rng(1)
  # sparse specks: a pixel that survives only through a small bilinear weight must still count
  masks = rng.uniform(size=shape) < 0.01
  expected = F.interpolate(torch.tensor(masks.reshape((-1, 1) + shape[-2:])).float(), size=size,
                           mode="bilinear", align_corners=False).bool().numpy()
  expected = expected.reshape(shape[:-2] + size)
  host = resize_bool_masks(masks, size)
  assert isinstance(host, np.ndarray) and host.dtype == bool
  np.testing.assert_array_equal(host, expected)
  np.testing.assert_array_equal(jax.jit(resize_bool_masks, static_argnums=1)(masks, size),
                                expected)


def test_parity_with_reference_terms_and_gradients(reference):
  outputs, targets = make_batch(seed=2)
  (total, terms), grads = _loss_and_grad(1)(outputs, targets)
  losses, leaves = reference(outputs, targets, float(targets.target_valid.sum()), 1)
  # the batch really exercises the o2m matcher, a query matched to two GT boxes included
  o2m = BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)(
    {k: torch.tensor(outputs[f"{k}_o2m"]) for k in ("pred_logits", "pred_boxes")},
    _torch_targets(targets))
  pairs = list(zip(o2m[0].tolist(), o2m[1].tolist()))
  assert len(pairs) > len(set(pairs)) > 0

  _compare_terms(terms, {k: _scalar(v) for k, v in losses.items()})
  np.testing.assert_allclose(float(total), _scalar(losses["core_loss"]), rtol=RTOL)

  losses["core_loss"].backward()
  ours = _our_grads_by_name(grads)
  assert set(ours) == set(leaves)
  for name, leaf in leaves.items():
    assert _rel_l2(ours[name], leaf.grad.numpy()) <= RTOL, name


def test_replicas_average_the_reference_per_replica_losses(reference):
  outputs, targets = make_batch(seed=3)
  (total, terms), _ = _loss_and_grad(2)(outputs, targets)
  halves = [slice(0, B // 2), slice(B // 2, B)]
  per_replica = []
  for half in halves:
    part_outputs = jax.tree.map(lambda x: x[half], outputs)
    part_targets = DetectionTargets(*(np.asarray(x)[half] for x in targets))
    losses, _ = reference(part_outputs, part_targets, float(targets.target_valid.sum()), 2)
    per_replica.append({k: _scalar(v) for k, v in losses.items()})
  averaged = {k: np.mean([r[k] for r in per_replica]) for k in per_replica[0]}
  _compare_terms(terms, averaged)
  np.testing.assert_allclose(float(total), averaged["core_loss"], rtol=RTOL)
  # the per-replica semantic means differ from a global mean over prompts here
  (_, single_replica), _ = _loss_and_grad(1)(outputs, targets)
  assert abs(float(single_replica["loss_semantic_seg"]) - float(terms["loss_semantic_seg"])) > 1e-3


def test_all_negative_batch_is_finite_and_matches_reference(reference):
  outputs, targets = make_batch(seed=4, negatives_only=True)
  (total, terms), grads = _loss_and_grad(1)(outputs, targets)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.isfinite(float(total)) and float(terms["presence_loss"]) > 0
  for name in ("loss_ce", "loss_bbox", "loss_mask", "loss_semantic_seg", "loss_dice_o2m"):
    assert float(terms[name]) == 0.0, name
  losses, _ = reference(outputs, targets, 0.0, 1)
  _compare_terms(terms, {k: _scalar(v) for k, v in losses.items()})
  np.testing.assert_allclose(float(total), _scalar(losses["core_loss"]), rtol=RTOL)


def _in_more_slots(targets, num_slots, seed):
  """The same targets among `num_slots` slots: the slots of each prompt at random positions in
  their order (the order the o2m classification target depends on), garbage in the others."""
  rng = np.random.default_rng(seed)
  batch, slots = targets.target_valid.shape
  boxes = (rng.normal(size=(batch, num_slots, 4)) * 9).astype(np.float32)
  valid = np.zeros((batch, num_slots), bool)
  masks = rng.uniform(size=(batch, num_slots, M, M)) < 0.5
  for b in range(batch):
    where = np.sort(rng.permutation(num_slots)[:slots])
    boxes[b, where], valid[b, where] = targets.boxes[b], targets.target_valid[b]
    masks[b, where] = targets.masks[b]
  return DetectionTargets(boxes, valid, masks)


@pytest.mark.parametrize("copies,num_slots", [(1, 40), (3, 200), (8, 45)])
def test_padded_slots_change_nothing(copies, num_slots):
  """The loss packs the valid slots first and computes on the smallest packed size that holds
  them (32 or T): scattered among more padded slots, the targets give the terms and
  gradients of the loss computed on every slot of the original batch."""
  batches = [make_batch(seed=20 + i) for i in range(copies)]
  outputs = batches[0][0]
  targets = DetectionTargets(*(np.concatenate(parts, axis=1)
                               for parts in zip(*(t for _, t in batches))))
  targets.target_valid[0] = True  # the largest count: 5, 15 or 40 valid slots
  # the loss computed on every slot as given, without packing
  unpacked = jax.jit(jax.value_and_grad(functools.partial(
    detection._slot_loss, weights=detection.LossWeights(), num_replicas=1,
    pad_num_queries=detection.PAD_NUM_QUERIES, scale_by_batch_size=True,
    iou_aware_targets=True), has_aux=True), compiler_options=parity.FAST_COMPILE)
  (total, terms), grads = unpacked(outputs, targets)
  (total_more, terms_more), grads_more = _loss_and_grad(1)(
    outputs, _in_more_slots(targets, num_slots, copies))
  np.testing.assert_allclose(total_more, total, rtol=1e-6)
  assert set(terms_more) == set(terms)
  for k in terms:
    np.testing.assert_allclose(terms_more[k], terms[k], rtol=1e-6, atol=1e-7, err_msg=k)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g_more = functools.reduce(lambda x, key: x[getattr(key, "key", getattr(key, "idx", None))],
                              path, grads_more)
    np.testing.assert_allclose(g_more, g, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_larger_targets_are_downsampled_on_device():
  """Targets at a larger size (not a multiple of M) give the loss of their host-side
  resize_bool_masks to M."""
  outputs, targets = make_batch(seed=5)
  big = np.random.default_rng(5).uniform(size=(B, T, 2 * M + 5, 2 * M + 5)) < 0.3
  (total_big, terms_big), _ = _loss_and_grad(1)(outputs, targets._replace(masks=big))
  (total, terms), _ = _loss_and_grad(1)(
    outputs, targets._replace(masks=resize_bool_masks(big, (M, M))))
  np.testing.assert_allclose(total_big, total, rtol=1e-6)
  assert set(terms) == set(terms_big)
  for k in terms:
    np.testing.assert_allclose(terms_big[k], terms[k], rtol=1e-6, err_msg=k)


def test_takes_the_model_training_outputs_and_differentiates_through_the_model():
  """Traced (not run) on the tiny model in training mode: every output the model produces is
  supervised, under value_and_grad with respect to the parameters."""
  config = get_preset("tiny")
  model = abstract_model(config)
  model.train()
  spec = jax.ShapeDtypeStruct
  targets = DetectionTargets(spec((2, 3, 4), jnp.float32), spec((2, 3), bool),
                             spec((2, 3, config.mask_size, config.mask_size), bool))

  def loss_and_grad(model, images, tokens, targets):
    return nnx.value_and_grad(lambda m: detection_loss(m(images, tokens), targets),
                              has_aux=True)(model)

  (total, terms), _ = jax.eval_shape(
    loss_and_grad, model, spec((2, config.img_size, config.img_size, 3), jnp.float32),
    spec((2, config.context_length), jnp.int32), targets)
  assert total.shape == () and total.dtype == jnp.float32
  layer_terms = ("loss_ce", "presence_loss", "loss_bbox", "loss_giou")
  expected = {*layer_terms, "loss_mask", "loss_dice", "loss_semantic_seg", "loss_semantic_dice"}
  expected |= {f"{k}_o2m" for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")}
  for i in range(config.num_dec_layers - 1):
    expected |= {f"{k}_aux_{i}" for k in layer_terms}
    expected |= {f"{k}_aux_{i}_o2m" for k in ("loss_ce", "loss_bbox", "loss_giou")}
  assert set(terms) == expected


def test_binary_targets_give_matched_queries_target_one(monkeypatch):
  """iou_aware_targets=False: every classification term is the IoU-aware one with each matched
  query's target raised to 1 (the clamp's floor set to 1); nothing else changes."""
  outputs, targets = make_batch(seed=5)
  binary = detection_loss(outputs, targets, iou_aware_targets=False)[1]
  iou_aware = detection_loss(outputs, targets)[1]
  monkeypatch.setattr(detection, "IOU_AWARE_MIN_TARGET", 1.0)
  floor_one = detection_loss(outputs, targets)[1]
  assert binary.keys() == iou_aware.keys()
  for name, value in binary.items():
    np.testing.assert_allclose(float(value), float(floor_one[name]), rtol=1e-6, err_msg=name)
    if name.startswith("loss_ce") and float(iou_aware[name]) > 0:
      assert abs(float(value) - float(iou_aware[name])) > 1e-4 * abs(float(value)), name
    elif not name.startswith("loss_ce"):
      assert float(value) == float(iou_aware[name]), name
