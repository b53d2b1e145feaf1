"""The whole training step's gradients: parity with Meta's PyTorch SAM 3 (PyPI sam3==0.1.4).

Meta's model runs in training mode (per-layer aux outputs, the one-to-many DAC queries, presence
logits, instance and semantic masks; activation checkpointing on, as sam3.train runs it) through
its own `forward(BatchedDatapoint)`, matched by its matcher and scored by `sam3.train`'s
Sam3LossWrapper as SAM 3's training config builds it; our Sam3Image in training mode runs the same
batch into `detection_loss` (default weights). Dropout and drop path are 0 on both sides, so both
are deterministic. Compared: the total loss, and the gradient of every parameter tensor, each
torch tensor against ours in its layout (the converter's `param_table`), at relative L2 <=
TOL_SMALL. The parameters that get no gradient on the torch side are an explicit list.
"""

import copy
import functools

import parity  # first: CPU workarounds (incl. a torch Triton focal-loss module) before sam3

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.layers
import torch
from flax import nnx
from sam3.model.data_misc import BatchedDatapoint, BatchedFindTarget, FindStage
from sam3.train.loss import loss_fns, sam3_loss
from test_detection import _reference_matcher, _reference_wrapper

from convert.sam3 import IGNORED_GROUPS
from convert.torch_layout import load_state_dict, param_table
from sam3i_jax.losses.detection import DetectionTargets, detection_loss
from sam3i_jax.models.sam3 import Sam3Image

PRESET = "tiny"  # 2 decoder layers: one aux layer besides the last, o2o and o2m each
TEXTS = ["a red car", "the helmet of the rider"]
# (cx, cy, w, h) GT boxes of prompt 0; prompt 1 is a negative (no targets)
GT_BOXES = [[0.30, 0.35, 0.30, 0.40], [0.70, 0.60, 0.25, 0.35], [0.50, 0.80, 0.60, 0.20]]
T = 4  # GT slots per prompt (padded)
# The "boxes" case adds geometric prompts, as SAM 3's training mixes them in: prompt 0 a positive
# box near its first GT box and a negative one; prompt 1 one positive box and a padding slot.
BOX_PROMPTS = np.float32([[[0.31, 0.34, 0.28, 0.42], [0.75, 0.25, 0.30, 0.20]],
                          [[0.45, 0.55, 0.50, 0.40], [0.50, 0.50, 1.00, 1.00]]])
BOX_LABELS = np.array([[True, False], [True, True]])
BOX_PADDING = np.array([[False, False], [False, True]])

# Torch parameters that get no gradient from the step (None, or all zeros), and why; asserted
# exactly (a parameter that starts or stops getting one is noticed), and ours must be zero too.
NO_GRADIENT = {
    "backbone.vision_backbone.convs.3.": "the neck's 0.5x branch: SAM3VLBackbone(scalp=1)",
    "backbone.language_backbone.encoder.text_projection":
        "CLIP's text projection, unused by VETextEncoder (and not converted)",
    "segmentation_head.pixel_decoder.conv_layers.2.": "third pixel-decoder stage (3 scales use 2)",
    "segmentation_head.pixel_decoder.norms.2.": "third pixel-decoder stage (3 scales use 2)",
    "geometry_encoder.points_": "point prompts: the image model's grounding ignores them",
}
NO_GRADIENT_WITHOUT_BOXES = {  # the box-prompt path of the geometry encoder (empty without boxes)
    prefix: "box prompts only" for prefix in ("geometry_encoder.boxes_",
                                              "geometry_encoder.img_pre_norm.",
                                              "geometry_encoder.label_embed.")}
# The last bias of each box-RPB MLP adds one constant per head to every attention logit of a
# query row (image cross-attention has no key padding): softmax is shift-invariant, so its exact
# gradient is 0 and both sides hold float32 round-off (~5e-7 against ~1 for the layer's weight).
# It is compared on the scale of that weight's gradient instead of its own.
SHIFT_INVARIANT = {f"transformer.decoder.boxRPB_embed_{a}.layers.1.bias":
                   f"transformer.decoder.boxRPB_embed_{a}.layers.1.weight" for a in "xy"}


def _no_gradient_reason(name: str, with_boxes: bool):
  table = NO_GRADIENT if with_boxes else {**NO_GRADIENT, **NO_GRADIENT_WITHOUT_BOXES}
  return next((why for prefix, why in table.items() if name.startswith(prefix)), None)


# -------------------------------------------------------------------------------------- batch

def _batch(config):
  """Two prompts on two images: prompt 0 with 3 GT boxes (masks: the boxes' pixels with holes),
  prompt 1 a negative; padded GT slots hold garbage."""
  rng = np.random.default_rng(11)
  s, m = config.img_size, config.mask_size
  images = rng.uniform(-1, 1, (2, 3, s, s)).astype(np.float32)
  boxes = rng.normal(0, 5, (2, T, 4)).astype(np.float32)  # garbage in padded slots
  valid = np.zeros((2, T), bool)
  masks = rng.uniform(size=(2, T, m, m)) < 0.5  # garbage in padded slots
  yy, xx = (np.mgrid[0:m, 0:m] + 0.5) / m
  for i, (cx, cy, w, h) in enumerate(GT_BOXES):
    boxes[0, i] = (cx, cy, w, h)
    valid[0, i] = True
    inside = (np.abs(xx - cx) <= w / 2) & (np.abs(yy - cy) <= h / 2)
    masks[0, i] = inside & (rng.uniform(size=(m, m)) < 0.9)
  return images, DetectionTargets(boxes, valid, masks)


def _find_target(targets: DetectionTargets) -> BatchedFindTarget:
  """The collator's BatchedFindTarget of `targets` (packed boxes/masks, padded copies)."""
  valid = np.asarray(targets.target_valid)
  b, n = len(valid), valid.sum(1)
  packed = torch.tensor(np.asarray(targets.boxes)[valid])
  padded = torch.zeros(b, int(n.max()), 4)
  ids_padded = torch.full((b, int(n.max())), -1, dtype=torch.long)
  start = 0
  for i in range(b):
    padded[i, :n[i]] = packed[start:start + n[i]]
    ids_padded[i, :n[i]] = torch.arange(start, start + n[i])
    start += n[i]
  return BatchedFindTarget(
      num_boxes=torch.tensor(n, dtype=torch.long), boxes=packed, boxes_padded=padded,
      repeated_boxes=torch.zeros(0, 4), segments=torch.tensor(np.asarray(targets.masks)[valid]),
      semantic_segments=torch.zeros(0, dtype=torch.bool),
      is_valid_segment=torch.ones(len(packed), dtype=torch.bool),
      is_exhaustive=torch.ones(b, dtype=torch.bool),
      object_ids=torch.arange(len(packed)), object_ids_padded=ids_padded)


# ---------------------------------------------------------------------------------- reference

def _training_reference(torch_model):
  """A copy of the cached reference model in training mode with every dropout and drop path at 0
  and the training matcher (sam3_cpu builds it with matcher=None, for inference)."""
  model = copy.deepcopy(torch_model)
  model.matcher = _reference_matcher()
  for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
    elif isinstance(module, torch.nn.MultiheadAttention):
      module.dropout = 0.0
    elif isinstance(module, timm.layers.DropPath):
      module.drop_prob = 0.0
  return model.train()


def _reference_step(monkeypatch, torch_model, images, texts, targets, prompts):
  """Meta's training step up to the gradients, as sam3.train's trainer runs it (model(batch),
  back_convert, the loss, backward): (core_loss, {parameter name: gradient or None})."""
  monkeypatch.setattr(loss_fns, "sigmoid_focal_loss",
                      functools.partial(loss_fns.sigmoid_focal_loss, triton=False))
  monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t)  # one replica
  monkeypatch.setattr(sam3_loss, "get_world_size", lambda: 1)
  model = _training_reference(torch_model)
  b = len(texts)
  if prompts is None:
    boxes, labels, padding = np.zeros((b, 0, 4), np.float32), *np.zeros((2, b, 0), bool)
  else:
    boxes, labels, padding = prompts
  find_input = FindStage(  # the collator's layout: boxes and labels sequence-first
      img_ids=torch.arange(b), text_ids=torch.arange(b),
      input_boxes=torch.from_numpy(boxes).transpose(0, 1),
      input_boxes_mask=torch.from_numpy(padding),
      input_boxes_label=torch.from_numpy(labels).long().transpose(0, 1),
      input_points=None, input_points_mask=None)
  find_target = _find_target(targets)
  batch = BatchedDatapoint(img_batch=torch.from_numpy(images), find_text_batch=list(texts),
                           find_inputs=[find_input], find_targets=[find_target],
                           find_metadatas=[None])
  losses = _reference_wrapper()(model(batch), [model.back_convert(find_target)])
  losses["core_loss"].backward()
  grads = {name: None if p.grad is None else p.grad.numpy()
           for name, p in model.named_parameters() if p.requires_grad}
  return float(losses["core_loss"].detach()), grads


# ---------------------------------------------------------------------------------------- ours

@functools.lru_cache(maxsize=1)
def _ours():
  """Our model with the reference's weights, in training mode, dropout and drop path 0, and its
  compiled step: (model, step(images, tokens, targets, prompts) -> ((total, terms), grads))."""
  config, _, state_dict = parity.reference_model(PRESET)
  model = Sam3Image(config.replace(dropout=0.0, vit_drop_path_rate=0.0), rngs=nnx.Rngs(0))
  load_state_dict(model, dict(state_dict), ignore=IGNORED_GROUPS)
  model.train()
  graphdef, state = nnx.split(model)

  def step(state, images, tokens, targets, prompts):
    # differentiated as the train step does (nnx.value_and_grad over the parameters); the
    # drop-path streams, at rate 0, are still drawn from, so the state is an argument
    model = nnx.merge(graphdef, state)
    loss = lambda m: detection_loss(m(images, tokens, *(prompts or ())), targets)  # noqa: E731
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(model)

  jitted = jax.jit(step, compiler_options=parity.FAST_COMPILE)
  return model, functools.partial(jitted, state)


def _by_torch_key(model, grads) -> dict:
  """{torch key: (our gradient of that tensor, the torch -> Flax layout transform)} by the
  converter's table (`param_table`: the Flax path and, for a stacked parameter, the layer)."""
  flat = {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
  out, used = {}, set()
  for key, entry in param_table(model).items():
    g = flat[tuple(entry.path)]
    out[key] = (g if entry.layer is None else g[entry.layer], entry.transform)
    used.add(tuple(entry.path))
  assert used == set(flat), f"gradients with no torch tensor: {sorted(set(flat) - used)}"
  return out


# --------------------------------------------------------------------------------------- test

@pytest.mark.parametrize("with_boxes", [False, True], ids=["text", "text+boxes"])
def test_training_step_gradients_match_reference(monkeypatch, with_boxes):
  config, torch_model, _ = parity.reference_model(PRESET)
  images, targets = _batch(config)
  lang = torch_model.backbone.language_backbone
  tokens = lang.tokenizer(TEXTS, context_length=lang.context_length).numpy()
  prompts = (BOX_PROMPTS, BOX_LABELS, BOX_PADDING) if with_boxes else None

  ref_total, ref_grads = _reference_step(monkeypatch, torch_model, images, TEXTS, targets, prompts)
  model, step = _ours()
  (total, terms), grads = step(jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens),
                               targets, prompts)
  ours = _by_torch_key(model, grads)

  # the batch exercises what the step supervises: matches on both query sets of both layers
  for name in ("loss_bbox", "loss_bbox_o2m", "loss_bbox_aux_0", "loss_bbox_aux_0_o2m",
               "loss_mask", "loss_mask_o2m", "loss_semantic_seg", "presence_loss"):
    assert float(terms[name]) > 0, name
  np.testing.assert_allclose(float(total), ref_total, rtol=parity.TOL_SMALL)

  # coverage: every trainable torch parameter is one of ours, but the one the converter ignores
  # (and which gets no gradient: NO_GRADIENT); none of ours is missing from the reference
  assert set(ours) <= set(ref_grads)
  assert set(ref_grads) - set(ours) == {"backbone.language_backbone.encoder.text_projection"}
  without = {k for k, g in ref_grads.items() if g is None or not np.any(g)}
  expected_without = {k for k in ref_grads if _no_gradient_reason(k, with_boxes)}
  assert without == expected_without, (
      f"unexpectedly without gradient: {sorted(without - expected_without)}; "
      f"unexpectedly with one: {sorted(expected_without - without)}")
  for name in sorted(without & set(ours)):
    assert not np.any(ours[name][0]), f"{name}: no gradient in the reference, ours is not zero"

  compared = sorted(set(ours) - without)
  errors = {}
  for name in compared:
    g, transform = ours[name]
    g_ref = transform(ref_grads[name])
    if name in SHIFT_INVARIANT:
      scale = np.linalg.norm(ref_grads[SHIFT_INVARIANT[name]])
      assert np.linalg.norm(g_ref) <= parity.TOL_SMALL * scale, f"{name}: not round-off"
      errors[name] = float(np.linalg.norm(np.float64(g) - g_ref) / scale)
    else:
      errors[name] = parity.rel_l2(g, g_ref)
  bad = {k: v for k, v in errors.items() if not v <= parity.TOL_SMALL}
  worst = max(errors, key=errors.get)
  print(f"\n{len(compared)} gradients compared, worst {errors[worst]:.3g} ({worst}); loss "
        f"{total:.8g} vs {ref_total:.8g}; without gradient: {len(without)}")
  if bad:
    pytest.fail(f"{len(bad)} of {len(compared)} gradients differ (relative L2 > "
                f"{parity.TOL_SMALL:g}): " + ", ".join(
                    f"{k} {v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])))
