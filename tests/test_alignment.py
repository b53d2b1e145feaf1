"""Stage-3 alignment losses: NumPy statements of the formulas, the reference's PyTorch formulas
(re-stated from SAM3-I's `Sam3LossWrapper`), stop-gradients, padding, and the data-parallel
gather on 4 simulated devices (in a subprocess)."""

import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam3i_jax.losses.alignment import (AlignmentWeights, alignment_losses,
                                        concept_anchor_margin, hard_region_bce,
                                        instance_infonce, kl_alignment)
from xla_cpu import xla_flags

RTOL = 1e-5
ATOL = 1e-7

_kl = jax.jit(kl_alignment)
_hard = jax.jit(hard_region_bce)
_infonce = jax.jit(instance_infonce)
_margin = jax.jit(concept_anchor_margin)


# ---------------------------------------------------------------------------------------------
# Inputs


CONCEPTS = ["Dog", "cat", "dog", "horse", "Cat", "bird"]  # "Dog" and "dog" are one concept


def _concept_ids(concepts):
  """The pipeline's rule: equal ids iff concept[0].lower() is equal."""
  names = sorted({c.lower() for c in concepts})
  return np.array([names.index(c.lower()) for c in concepts], np.int32)


def _inputs(seed=0, batch=len(CONCEPTS), grid=8, gt_size=8, dim=16):
  rng = np.random.default_rng(seed)
  seg_a = (3 * rng.normal(size=(batch, 1, grid, grid))).astype(np.float32)
  seg_b = (seg_a + 2 * rng.normal(size=seg_a.shape)).astype(np.float32)
  gt = rng.random((batch, gt_size, gt_size)) < 0.3
  gt[-1] = False  # a negative example
  feat_a = rng.normal(size=(batch, dim)).astype(np.float32)
  feat_b = (feat_a + rng.normal(size=feat_a.shape)).astype(np.float32)
  anchors = (feat_a + 2 * rng.normal(size=feat_a.shape)).astype(np.float32)
  return dict(seg_a=seg_a, seg_b=seg_b, union_gt=gt, feat_a=feat_a, feat_b=feat_b,
              anchors=anchors, concept_id=_concept_ids(CONCEPTS[:batch]),
              example_valid=np.ones(batch, bool))


def _with_padding(x, num_pad=2, seed=1):
  """Append padding examples filled with noise (they must change nothing)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in x.items():
    if k == "example_valid":
      pad = np.zeros(num_pad, bool)
    elif k == "concept_id":
      pad = np.array([v[0], 99][:num_pad], np.int32)  # one shares a real concept
    elif v.dtype == bool:
      pad = rng.random((num_pad,) + v.shape[1:]) < 0.5
    else:
      pad = (5 * rng.normal(size=(num_pad,) + v.shape[1:])).astype(v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


# ---------------------------------------------------------------------------------------------
# NumPy statements of the formulas (float64)


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_kl(seg_a, seg_b):
  total = 0.0
  for a, b in zip(seg_a.astype(np.float64), seg_b.astype(np.float64)):
    p_a, p_b = np_softmax(a.ravel()), np_softmax(b.ravel())
    total += 0.5 * (np.sum(p_b * np.log(p_b / p_a)) + np.sum(p_a * np.log(p_a / p_b)))
  return total / len(seg_a)


def np_bilinear_matrix(n_in, n_out):
  """Rows: torch's bilinear (align_corners=False) weights of each output sample."""
  w = np.zeros((n_out, n_in))
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(np.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    w[o, i0] += 1 - (src - i0)
    w[o, i1] += src - i0
  return w


def np_hard(seg_a, seg_b, gt):
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  total = 0.0
  for a, b, y in zip(seg_a[:, 0].astype(np.float64), seg_b[:, 0].astype(np.float64), gt):
    rows = np_bilinear_matrix(a.shape[0], y.shape[0])
    cols = np_bilinear_matrix(a.shape[1], y.shape[1])
    a, b = rows @ a @ cols.T, rows @ b @ cols.T
    p_a = np.clip(sigmoid(a), 1e-6, 1 - 1e-6)
    p_b = np.clip(sigmoid(b), 1e-6, 1 - 1e-6)
    m = (p_a + p_b) / 2
    w = 0.5 * (m * np.log(m / p_a) + m * np.log(m / p_b))
    bce = lambda x: -(y * np.log(sigmoid(x)) + (1 - y) * np.log(1 - sigmoid(x)))
    total += 0.5 * (np.mean(w * bce(a)) + np.mean(w * bce(b)))
  return total / len(seg_a)


def np_normalize(x):
  x = x.astype(np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def np_infonce(feat_a, feat_b, concepts, tau=0.1, rho=0.5):
  n = len(feat_a)
  f = np.concatenate([np_normalize(feat_a), np_normalize(feat_b)])
  concept = [c.lower() for c in concepts] * 2
  losses = []
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    s = f @ f[i] / tau
    top = s.max()  # over every column, self included
    denominator = 0.0
    for j in range(2 * n):
      if j == i:
        continue
      w = 1.0 if (j == pos or concept[j] != concept[i]) else rho
      denominator += w * np.exp(s[j] - top)
    losses.append(np.log(denominator + 1e-8) - (s[pos] - top))
  return np.mean(losses)


def np_margin(feat_a, feat_b, anchors, concepts, m=0.2):
  s = np_normalize((feat_a.astype(np.float64) + feat_b) / 2)
  c = np_normalize(anchors)
  concept = [x.lower() for x in concepts]
  losses = []
  for i in range(len(s)):
    negatives = [s[i] @ c[j] for j in range(len(s)) if concept[j] != concept[i]]
    if negatives:
      losses.append(max(0.0, max(negatives) - s[i] @ c[i] + m))
  return np.mean(losses) if losses else 0.0


# ---------------------------------------------------------------------------------------------
# The reference's PyTorch formulas, re-stated (Sam3LossWrapper, sam3i_3_all.yaml)


def torch_kl(seg_a, seg_b):
  def one_way(x, target):  # compute_kl_loss_with_alignment: x towards target.detach()
    n = x.shape[0]
    return F.kl_div(F.log_softmax(x.reshape(n, -1), dim=1),
                    F.softmax(target.detach().reshape(n, -1), dim=1), reduction="batchmean")
  return (one_way(seg_a, seg_b) + one_way(seg_b, seg_a)) / 2


def torch_hard(seg_a, seg_b, gt):
  def one_way(x, other):  # compute_enhanced_segmentation_loss
    size = gt.shape[-2:]
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    other = F.interpolate(other.float(), size=size, mode="bilinear", align_corners=False)
    p_x = torch.clamp(torch.sigmoid(x.detach()), 1e-6, 1 - 1e-6)
    p_o = torch.clamp(torch.sigmoid(other.detach()), 1e-6, 1 - 1e-6)
    m = 0.5 * (p_x + p_o)
    w = 0.5 * (F.kl_div(p_x.log(), m, reduction="none") + F.kl_div(p_o.log(), m, reduction="none"))
    bce = F.binary_cross_entropy_with_logits(x.squeeze(1), gt.float(), reduction="none")
    return (bce * w.squeeze(1)).mean(dim=[1, 2]).mean()
  return (one_way(seg_a, seg_b) + one_way(seg_b, seg_a)) / 2


def torch_infonce(feat_a, feat_b, concepts, tau=0.1, rho=0.5):
  n = feat_a.shape[0]
  feats = torch.cat([F.normalize(feat_a, dim=-1, eps=1e-8), F.normalize(feat_b, dim=-1, eps=1e-8)])
  sim = feats @ feats.T / tau
  labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
  not_self = 1 - torch.eye(2 * n)
  names = [c.lower() for c in concepts] * 2
  same = torch.tensor([[a == b for b in names] for a in names])
  weights = torch.ones_like(sim)
  weights[same] = rho
  weights.scatter_(1, labels.view(-1, 1), 1.0)
  weights = weights * not_self
  shifted = sim - sim.max(dim=1, keepdim=True)[0].detach()
  log_sum = torch.log((torch.exp(shifted) * weights).sum(dim=1) + 1e-8)
  return (log_sum - shifted.gather(1, labels.view(-1, 1)).squeeze(1)).mean()


def torch_margin(feat_a, feat_b, anchors, concepts, m=0.2):
  s = F.normalize((feat_a + feat_b) / 2.0, dim=-1, eps=1e-8)
  c = F.normalize(anchors, dim=-1, eps=1e-8)
  sim = s @ c.T
  names = [x.lower() for x in concepts]
  losses = []
  for i in range(len(names)):
    negatives = [j for j in range(len(names)) if names[j] != names[i]]
    if negatives:
      losses.append(F.relu(sim[i, negatives].max() - sim[i, i] + m))
  return torch.stack(losses).mean() if losses else torch.tensor(0.0)


def _torch_value_and_grads(fn, arrays, *rest):
  tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
  value = fn(*tensors, *rest)
  value.backward()
  return value.item(), [t.grad.numpy() for t in tensors]


def _jax_value_and_grads(fn, x, names):
  params = inspect.signature(fn).parameters
  x = {k: v for k, v in x.items() if k in params}

  def loss(*diff):
    return fn(**{**x, **dict(zip(names, diff))})
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names)))))(
    *(x[k] for k in names))
  return float(value), [np.asarray(g) for g in grads]


def _check(ours, ref, rtol=RTOL):
  value, grads = ours
  ref_value, ref_grads = ref
  np.testing.assert_allclose(value, ref_value, rtol=rtol, atol=ATOL)
  for g, rg in zip(grads, ref_grads):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-6 * np.abs(rg).max())


# ---------------------------------------------------------------------------------------------
# Values and gradients against NumPy and the reference's formulas


@pytest.mark.parametrize("gt_size", [8, 28])  # 28: logits upsampled by a non-integer 3.5x
def test_kl_and_hard_match_numpy_and_reference(gt_size):
  x = _inputs(gt_size=gt_size)
  seg = [x["seg_a"], x["seg_b"]]
  gt = torch.tensor(x["union_gt"])
  names = ("seg_a", "seg_b")

  kl = _jax_value_and_grads(kl_alignment, x, names)
  np.testing.assert_allclose(kl[0], np_kl(*seg), rtol=RTOL)
  _check(kl, _torch_value_and_grads(torch_kl, seg))

  hard = _jax_value_and_grads(hard_region_bce, x, names)
  np.testing.assert_allclose(hard[0], np_hard(*seg, x["union_gt"]), rtol=RTOL)
  _check(hard, _torch_value_and_grads(torch_hard, seg, gt))


def test_contrastive_terms_match_numpy_and_reference():
  x = _inputs()
  feats = [x["feat_a"], x["feat_b"]]

  infonce = _jax_value_and_grads(instance_infonce, x, ("feat_a", "feat_b"))
  np.testing.assert_allclose(infonce[0], np_infonce(*feats, CONCEPTS), rtol=RTOL)
  _check(infonce, _torch_value_and_grads(torch_infonce, feats, CONCEPTS))

  margin = _jax_value_and_grads(concept_anchor_margin, x, ("feat_a", "feat_b", "anchors"))
  np.testing.assert_allclose(margin[0], np_margin(*feats, x["anchors"], CONCEPTS), rtol=RTOL)
  _check(margin, _torch_value_and_grads(torch_margin, feats + [x["anchors"]], CONCEPTS))
  assert np.abs(margin[1][2]).max() > 0  # the anchors are trained too (not detached)
  assert margin[0] > 0


def test_hyper_parameters_are_used():
  x = _inputs()
  feats = [x["feat_a"], x["feat_b"]]
  args = (x["feat_a"], x["feat_b"], x["concept_id"], x["example_valid"])
  value = _infonce(*args, temperature=0.3, same_concept_weight=0.2)
  np.testing.assert_allclose(value, np_infonce(*feats, CONCEPTS, tau=0.3, rho=0.2), rtol=RTOL)
  value = _margin(x["feat_a"], x["feat_b"], x["anchors"], x["concept_id"], x["example_valid"],
                  margin=0.7)
  np.testing.assert_allclose(value, np_margin(*feats, x["anchors"], CONCEPTS, m=0.7), rtol=RTOL)


def test_infonce_max_subtraction_and_log_eps():
  """A lone example gives ~0 (its positive is the only term) unless its branches disagree so much
  that exp(S_pos - S_self) is comparable to the reference's 1e-8."""
  feat = np.array([[1.0, 2.0, -0.5]], np.float32)
  ids, valid = np.zeros(1, np.int32), np.ones(1, bool)
  assert abs(float(_infonce(feat, 2 * feat, ids, valid))) < 1e-6
  opposite = float(_infonce(feat, -feat, ids, valid))  # S_pos - max = -1/0.1 - 1/0.1 = -20
  np.testing.assert_allclose(opposite, np.log(np.exp(-20.0) + 1e-8) + 20.0, rtol=RTOL)


def test_weighted_total():
  x = _inputs(gt_size=28)
  weights = AlignmentWeights(kl=0.3, hard=2.0, infonce=0.5, margin=3.0)
  total, terms = jax.jit(alignment_losses, static_argnames="weights")(**x, weights=weights)
  feats = [x["feat_a"], x["feat_b"]]
  expected = {"kl": 0.3 * np_kl(x["seg_a"], x["seg_b"]),
              "hard": 2.0 * np_hard(x["seg_a"], x["seg_b"], x["union_gt"]),
              "infonce": 0.5 * np_infonce(*feats, CONCEPTS),
              "margin": 3.0 * np_margin(*feats, x["anchors"], CONCEPTS)}
  assert set(terms) == set(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(terms[k], v, rtol=RTOL, err_msg=k)
  np.testing.assert_allclose(total, sum(expected.values()), rtol=RTOL)
  defaults = AlignmentWeights()
  assert (defaults.kl, defaults.hard, defaults.infonce, defaults.margin) == (0.001, 1.0, 1.0, 1.0)
  assert (defaults.temperature, defaults.same_concept_weight, defaults.anchor_margin) == (
    0.1, 0.5, 0.2)


# ---------------------------------------------------------------------------------------------
# Stop-gradients


def test_stop_gradients_are_where_the_reference_detaches():
  x = _inputs()
  n, hw = x["seg_a"].shape[0], x["seg_a"][0].size
  a = x["seg_a"].reshape(n, hw).astype(np.float64)
  b = x["seg_b"].reshape(n, hw).astype(np.float64)
  p_a = np.stack([np_softmax(r) for r in a])
  p_b = np.stack([np_softmax(r) for r in b])
  # d/dA of 1/2 KL(sg(P_B) || P_A) is (P_A - P_B) / 2; KL(sg(P_A) || P_B) adds nothing
  grad_a = jax.jit(jax.grad(kl_alignment))(x["seg_a"], x["seg_b"], x["example_valid"])
  np.testing.assert_allclose(np.asarray(grad_a).reshape(n, hw), (p_a - p_b) / (2 * n),
                             rtol=1e-4, atol=1e-9)

  # the disagreement weight is a constant: d/dA = w (sigmoid(A) - y) / (2 n HW)
  s_a, s_b = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
  q_a, q_b = np.clip(s_a, 1e-6, 1 - 1e-6), np.clip(s_b, 1e-6, 1 - 1e-6)
  m = (q_a + q_b) / 2
  w = 0.5 * (m * np.log(m / q_a) + m * np.log(m / q_b))
  y = x["union_gt"].reshape(n, hw)
  grad_a = jax.jit(jax.grad(hard_region_bce))(x["seg_a"], x["seg_b"], x["union_gt"],
                                              x["example_valid"])
  expected = w * (s_a - y) / (2 * n * hw)  # w cancels catastrophically in float32 where p_A ~ p_B
  np.testing.assert_allclose(np.asarray(grad_a).reshape(n, hw), expected,
                             rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# Padding, degenerate batches


def test_padding_examples_change_nothing():
  x = _inputs(gt_size=28)
  padded = _with_padding(x)
  n = len(x["example_valid"])
  diff = ("seg_a", "seg_b", "feat_a", "feat_b", "anchors")

  def run(inputs):
    def total(*d):
      return alignment_losses(**{**inputs, **dict(zip(diff, d))})
    return jax.jit(jax.value_and_grad(total, argnums=tuple(range(len(diff))), has_aux=True))(
      *(inputs[k] for k in diff))

  (total, terms), grads = run(x)
  (total_p, terms_p), grads_p = run(padded)
  for k in terms:
    np.testing.assert_allclose(terms_p[k], terms[k], rtol=RTOL, err_msg=k)
  for name, g, gp in zip(diff, grads, grads_p):
    np.testing.assert_allclose(gp[:n], g, rtol=1e-4, atol=1e-9, err_msg=name)
    assert not np.asarray(gp[n:]).any(), f"{name}: padding examples got gradient"


def test_no_valid_examples_give_zero_and_finite_gradients():
  x = _with_padding(_inputs(batch=1), num_pad=2)
  x["example_valid"][:] = False
  x["feat_a"][1] = 0.0  # a zero feature (F.normalize's eps branch)
  diff = ("seg_a", "seg_b", "feat_a", "feat_b", "anchors")

  def total(*d):
    return alignment_losses(**{**x, **dict(zip(diff, d))})[0]

  value, grads = jax.jit(jax.value_and_grad(total, argnums=tuple(range(len(diff)))))(
    *(x[k] for k in diff))
  assert float(value) == 0.0
  for name, g in zip(diff, grads):
    assert np.isfinite(g).all() and not g.any(), name


def test_margin_without_other_concepts_is_zero():
  x = _inputs()
  same = np.zeros_like(x["concept_id"])
  value, grads = jax.jit(jax.value_and_grad(concept_anchor_margin, argnums=(0, 1, 2)))(
    x["feat_a"], x["feat_b"], x["anchors"], same, x["example_valid"])
  assert float(value) == 0.0
  assert all(np.isfinite(g).all() for g in grads)
  # a negative exists for every valid row as soon as two concepts are present (so the reference's
  # "rows with >= 1 negative" is all valid rows or none); here row 0 is every row's negative
  one_other = same.copy()
  one_other[0] = 1
  value = _margin(x["feat_a"], x["feat_b"], x["anchors"], one_other, x["example_valid"])
  names = ["x"] + ["y"] * (len(same) - 1)
  np.testing.assert_allclose(value, np_margin(x["feat_a"], x["feat_b"], x["anchors"], names),
                             rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Data parallelism: 4 simulated CPU devices (XLA_FLAGS must be set before jax is imported)


def test_gathered_on_four_devices_equals_single_device():
  script = os.path.join(os.path.dirname(__file__), "alignment_multidevice.py")
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
