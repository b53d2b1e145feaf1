"""SAM3-I's instruction levels and adapters (sam3i_jax.models.adapters / levels, level routing).

The reference adapters are restated in PyTorch below from github.com/debby-0527/SAM3-I
(text_encoder_ve_ada.py, encoder.py, decoder.py); the adapted layers are Meta's SAM 3 layers with
exactly the lines SAM3-I changes restated around them.
"""

import copy
import functools
import re

import numpy as np
import parity  # noqa: I001  (before torch / sam3)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jax
import jax.numpy as jnp
from flax import nnx

from convert.sam3 import IGNORED_GROUPS, initialise, sam3i_fresh
from convert.torch_layout import load_state_dict
from sam3i_jax import partition
from sam3i_jax.losses import alignment
from sam3i_jax.losses.detection import detection_loss
from sam3i_jax.models.adapters import copy_mask_predictor, migrate_to_complex
from sam3i_jax.models.decoder import TransformerDecoderLayer
from sam3i_jax.models.encoder import TransformerEncoderLayer
from sam3i_jax.models.levels import Level, parse_level
from sam3i_jax.models.sam3 import Sam3Image, TextFeatures, abstract_model
from sam3i_jax.models.text_encoder import ResidualAttentionBlock, causal_bias
from sam3i_jax.pretrained import materialise
from sam3i_jax.tree_paths import dotted

ADAPTED = ("simple", "complex")


# --- the reference adapters, restated ------------------------------------------------------------
class TorchTextAdapter(nn.Module):
  """text_encoder_ve_ada.MultiHeadMLPAdapter: h = x + MHA(norm1(x)) (no mask);
  return h + up_proj(gelu(down_proj(norm2(h))))."""

  def __init__(self, width: int, heads: int, bottleneck: int):
    super().__init__()
    self.mha_adapter = nn.MultiheadAttention(width, heads, dropout=0.1, batch_first=True)
    self.down_proj = nn.Linear(width, bottleneck)
    self.up_proj = nn.Linear(bottleneck, width)
    self.norm1 = nn.LayerNorm(width)
    self.norm2 = nn.LayerNorm(width)

  def forward(self, x):
    t = self.norm1(x)
    x = x + self.mha_adapter(t, t, t)[0]
    return x + self.up_proj(F.gelu(self.down_proj(self.norm2(x))))


class TorchBottleneckAdapter(nn.Module):
  """encoder.py / decoder.py MultiHeadMLPAdapter: up_proj(gelu(norm(down_proj(x)))) (+ x with
  skip_connect, the fusion encoder's adapter2)."""

  def __init__(self, dim: int, bottleneck: int, skip_connect: bool = False):
    super().__init__()
    self.down_proj = nn.Linear(dim, bottleneck)
    self.up_proj = nn.Linear(bottleneck, dim)
    self.norm = nn.LayerNorm(bottleneck)
    self.skip_connect = skip_connect

  def forward(self, x):
    y = self.up_proj(F.gelu(self.norm(self.down_proj(x))))
    return y + x if self.skip_connect else y


def torch_adapter_triple(make, seed: int) -> nn.ModuleDict:
  """adapter1, adapter12, adapter2 with random weights everywhere (LayerNorms too)."""
  torch.manual_seed(seed)
  triple = nn.ModuleDict({name: make(name) for name in ("adapter1", "adapter12", "adapter2")}).eval()
  with torch.no_grad():
    for p in triple.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  return triple


def torch_adapter_output(triple: nn.ModuleDict, x, level: str):
  """The routed adapters: adapter1(x) (simple) or adapter2(adapter12(x)) (complex)."""
  return triple["adapter1"](x) if level == "simple" else triple["adapter2"](triple["adapter12"](x))


def numpy_state(module: nn.Module, prefix: str) -> dict:
  return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


# --- the three adapted layers against the restatement --------------------------------------------
PRESET = "small"  # odd sizes: text width 48 with 3 adapter heads, d_model 32, bottleneck 8


def _inputs(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("level", ADAPTED)
def test_text_block_matches_reference(level):
  config, model, sd = parity.reference_model(PRESET)
  config = config.replace(adapters=True)
  prefix = "backbone.language_backbone.encoder.transformer.resblocks.1."
  tblock = model.backbone.language_backbone.encoder.transformer.resblocks[1]
  triple = torch_adapter_triple(
      lambda _: TorchTextAdapter(config.text_width, config.text_adapter_heads,
                                 config.text_adapter_bottleneck), 0)
  length = config.context_length
  x = _inputs((2, length, config.text_width), 1)
  causal = torch.full((length, length), float("-inf")).triu(1)
  with torch.no_grad():  # AdapterResidualBlock.forward
    t = torch.from_numpy(x)
    t = t + tblock.attention(tblock.ln_1(t), attn_mask=causal)
    mlp = tblock.mlp(tblock.ln_2(t))
    ref = torch_adapter_output(triple, t, level) + mlp
  state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  state.update(numpy_state(triple, ""))
  ours = parity.build(lambda: ResidualAttentionBlock(config, rngs=nnx.Rngs(0)), state, "")
  out = parity.fast_jit(lambda m, x, b: m(x, b, Level(level)), ours)(x, causal_bias(length))
  parity.assert_close(out, parity.to_numpy(ref), parity.TOL_SMALL, f"text block ({level})")


@pytest.mark.parametrize("level", ADAPTED)
def test_fusion_encoder_layer_matches_reference(level):
  config, model, sd = parity.reference_model(PRESET)
  config = config.replace(adapters=True)
  prefix = "transformer.encoder.layers.0."
  tlayer = model.transformer.encoder.layers[0]
  d, bottleneck = config.d_model, config.adapter_bottleneck
  triple = torch_adapter_triple(lambda name: TorchBottleneckAdapter(d, bottleneck, name == "adapter2"), 1)
  tokens, prompt_len = config.grid_size ** 2, 7
  image, pos = _inputs((2, tokens, d), 2), _inputs((2, tokens, d), 3)
  prompt = _inputs((2, prompt_len, d), 4)
  mask = np.zeros((2, prompt_len), bool)
  mask[0, 4:] = True
  # TransformerEncoderLayer_Ada.forward_pre ends with `adapter_forward(x) + FFN(norm3(x))`, SAM 3's
  # with `x + FFN(norm3(x))`: the difference is the adapter output at the stream norm3 receives.
  seen = {}
  hook = tlayer.norm3.register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
  with torch.no_grad():
    sam3 = tlayer(tgt=torch.from_numpy(image), memory=torch.from_numpy(prompt),
                  memory_key_padding_mask=torch.from_numpy(mask), query_pos=torch.from_numpy(pos))
    ref = sam3 + torch_adapter_output(triple, seen["x"], level)
  hook.remove()
  state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  state.update(numpy_state(triple, ""))
  ours = parity.build(lambda: TransformerEncoderLayer(
      config, rngs=nnx.Rngs(0), pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False, adapters=True),
      state, "")
  out = parity.fast_jit(lambda m, *a: m(a[0], a[1], query_pos=a[2], memory_key_padding_mask=a[3],
                                        level=Level(level)), ours)(image, prompt, pos, mask)
  parity.assert_close(out, parity.to_numpy(ref), parity.TOL_SMALL, f"encoder layer ({level})")


@pytest.mark.parametrize("level", ADAPTED)
def test_decoder_layer_matches_reference(level):
  config, model, sd = parity.reference_model(PRESET)
  config = config.replace(adapters=True)
  prefix = "transformer.decoder.layers.2."
  tlayer = copy.deepcopy(model.transformer.decoder.layers[2])
  d, heads, n, prompt_len = config.d_model, config.num_heads, config.num_queries, 5
  triple = torch_adapter_triple(lambda _: TorchBottleneckAdapter(d, config.adapter_bottleneck), 2)

  def forward_ffn(tgt):  # TransformerDecoderLayer_Ada.forward_ffn
    ffn = tlayer.linear2(tlayer.dropout3(tlayer.activation(tlayer.linear1(tgt))))
    return tlayer.norm3(tgt + torch_adapter_output(triple, tgt, level) + tlayer.dropout4(ffn))

  tlayer.forward_ffn = forward_ffn
  memory_len = config.grid_size ** 2
  tgt, qpos = _inputs((2, n, d), 5), _inputs((2, n, d), 6)
  presence, prompt = _inputs((2, 1, d), 7), _inputs((2, prompt_len, d), 8)
  memory, pos = _inputs((2, memory_len, d), 9), _inputs((2, memory_len, d), 10)
  bias = _inputs((2, heads, n, memory_len), 11)
  mask = np.zeros((2, prompt_len), bool)
  mask[1, 2:] = True
  with torch.no_grad():
    out_ref, pres_ref = tlayer(
        tgt=parity.seq_first(tgt), tgt_query_pos=parity.seq_first(qpos),
        memory_text=parity.seq_first(prompt), text_attention_mask=torch.from_numpy(mask),
        memory=parity.seq_first(memory), memory_pos=parity.seq_first(pos),
        cross_attn_mask=torch.from_numpy(bias).flatten(0, 1), dac=False, dac_use_selfatt_ln=True,
        presence_token=parity.seq_first(presence))
  state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  state.update(numpy_state(triple, ""))
  ours = parity.build(lambda: TransformerDecoderLayer(config, rngs=nnx.Rngs(0)), state, "")
  out, pres = parity.fast_jit(lambda m, *a: m(*a, level=Level(level)), ours)(
      tgt, qpos, presence, prompt, mask, memory, pos, bias)
  parity.assert_close(out, parity.to_numpy(out_ref.transpose(0, 1)), parity.TOL_SMALL, f"queries ({level})")
  parity.assert_close(pres, parity.to_numpy(pres_ref.transpose(0, 1)), parity.TOL_SMALL,
                      f"presence ({level})")


# --- the assembled model (tiny) ------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames="level", compiler_options=parity.FAST_COMPILE)
def forward(model, images, tokens, level="concept"):
  return model(images, tokens, level=level)


@functools.partial(jax.jit, static_argnames="level", compiler_options=parity.FAST_COMPILE)
def text_features(model, tokens, level):
  return model.encode_text(tokens, level).tokens


def perturbed(state: nnx.State, pattern: str, seed: int, scale: float = 0.05) -> nnx.State:
  """`state` with Gaussian noise added to the parameters whose dotted path matches `pattern`."""
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param) and re.search(pattern, ".".join(map(str, path))):
      var = var.replace(var[...] + scale * rng.standard_normal(var.shape).astype(np.float32))
    flat.append((path, var))
  return nnx.from_flat_state(flat)


OUTPUT_PROJECTIONS = r"(adapter(1|12|2)\.(up_proj|mha_adapter\.out_proj)|mask_predictor_adapter[12])\."


class Tiny:
  """The tiny SAM 3 with Meta's reference weights, and SAM3-I built on it as a SAM 3 checkpoint
  would be (adapters at their init, mask-predictor copies of mask_predictor)."""

  def __init__(self):
    config, torch_model, sd = parity.reference_model("tiny")
    self.config = config.replace(adapters=True)
    self.sam3 = parity.build(lambda: Sam3Image(config, rngs=nnx.Rngs(0)), sd, "")
    sam3i = abstract_model(self.config)
    report = load_state_dict(sam3i, dict(sd), ignore=IGNORED_GROUPS, fresh=sam3i_fresh())
    initialise(sam3i, self.config, [k for keys in report.fresh.values() for k in keys])
    self.graphdef, params, rest = nnx.split(sam3i, nnx.Param, ...)
    self.fresh = nnx.merge_state(params, jax.tree.map(materialise, rest))
    # Every adapter away from the identity: all output projections and mask-predictor copies moved.
    self.moved = perturbed(self.fresh, OUTPUT_PROJECTIONS, seed=0)
    image = np.random.default_rng(3).uniform(-1, 1, (2, config.img_size, config.img_size, 3))
    self.images = jnp.asarray(image, jnp.float32)
    texts = ["a red car", "the helmet that protects the rider on the left of the black horse"]
    self.tokens = jnp.asarray(sam3_tokens(torch_model, texts))

  def model(self, state: nnx.State) -> Sam3Image:
    return nnx.merge(self.graphdef, state)

  def run(self, state, level):
    return jax.device_get(forward(self.model(state), self.images, self.tokens, level))


def sam3_tokens(torch_model, texts) -> np.ndarray:
  backbone = torch_model.backbone.language_backbone
  return backbone.tokenizer(texts, context_length=backbone.context_length).numpy().astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
  return Tiny()


@pytest.fixture(scope="module")
def sam3_outputs(tiny):
  return jax.device_get(forward(tiny.sam3, tiny.images, tiny.tokens))


def assert_same(ours: dict, ref: dict, exact: bool, tag: str) -> None:
  for name in parity.COMPARED:
    if exact:
      np.testing.assert_array_equal(ours[name], ref[name], err_msg=f"{tag}: {name}")
    else:
      parity.assert_close(ours[name], ref[name], parity.TOL_SMALL, f"{tag}: {name}")


def test_concept_level_is_sam3_bitwise(tiny, sam3_outputs):
  # With every adapter moved away from the identity: the concept level must not run any of them.
  assert_same(tiny.run(tiny.moved, "concept"), sam3_outputs, exact=True, tag="concept")


def test_untrained_adapters_compute_sam3(tiny, sam3_outputs):
  # Equal up to float reassociation (XLA fuses the larger graph differently): ~1e-6.
  for level in ADAPTED:
    assert_same(tiny.run(tiny.fresh, level), sam3_outputs, exact=False, tag=f"{level} at init")


# One group of adapters per row: its level must see the change, the other level must not.
GROUPS = {
    "text adapter1": (r"language_backbone\..*\.adapter1\.", "simple"),
    "fusion-encoder adapter1": (r"transformer\.encoder\..*\.adapter1\.", "simple"),
    "decoder adapter1": (r"transformer\.decoder\..*\.adapter1\.", "simple"),
    "mask_predictor_adapter1": (r"mask_predictor_adapter1\.", "simple"),
    "text adapter12": (r"language_backbone\..*\.adapter12\.", "complex"),
    "text adapter2": (r"language_backbone\..*\.adapter2\.", "complex"),
    "fusion-encoder adapter12": (r"transformer\.encoder\..*\.adapter12\.", "complex"),
    "fusion-encoder adapter2": (r"transformer\.encoder\..*\.adapter2\.", "complex"),
    "decoder adapter12": (r"transformer\.decoder\..*\.adapter12\.", "complex"),
    "decoder adapter2": (r"transformer\.decoder\..*\.adapter2\.", "complex"),
    "mask_predictor_adapter2": (r"mask_predictor_adapter2\.", "complex"),
}


def test_every_adapter_group_changes_its_level_only(tiny, sam3_outputs):
  base = {level: tiny.run(tiny.moved, level) for level in ADAPTED}
  for level in ADAPTED:
    assert parity.rel_l2(base[level]["pred_masks"], sam3_outputs["pred_masks"]) > 1e-3, level
  for i, (group, (pattern, level)) in enumerate(GROUPS.items()):
    state = perturbed(tiny.moved, pattern, seed=10 + i, scale=0.2)
    other = "complex" if level == "simple" else "simple"
    changed = tiny.run(state, level)
    assert parity.rel_l2(changed["pred_masks"], base[level]["pred_masks"]) > 1e-4, group
    assert_same(tiny.run(state, other), base[other], exact=True, tag=f"{group} at {other}")


# --- every trainable parameter learns ---------------------------------------------------------------
def training_loss(outputs, batch):
  return detection_loss(outputs, batch)[0]


def contract_batch(config, batch_size: int, targets: int = 3) -> dict:
  """GT in the batch contract's layout (boxes, target_valid, masks at the mask resolution)."""
  rng = np.random.default_rng(5)
  m = config.mask_size
  masks = np.zeros((batch_size, targets, m, m), bool)
  masks[:, 0, m // 4:m // 2, m // 3:m // 2] = True
  boxes = np.tile(np.array([[5 / 12, 3 / 8, 1 / 6, 1 / 4]], np.float32), (batch_size, targets, 1))
  valid = np.zeros((batch_size, targets), bool)
  valid[:, 0] = True
  return {"boxes": boxes + 0.01 * rng.standard_normal(boxes.shape).astype(np.float32),
          "target_valid": valid, "masks": masks}


def test_every_trainable_parameter_gets_a_gradient(tiny):
  """Stage by stage, each trainable leaf gets a non-zero gradient from its stage's losses (once the
  adapters left the identity, as after a first optimiser step), and each level's loss leaves the
  other level's adapters alone. Eval mode (no DAC copies, no dropout) reaches the same parameters
  and compiles twice as fast; the frozen image encoder runs outside the differentiated part."""
  model = tiny.model(tiny.moved)
  image = jax.jit(lambda m, x: m.encode_image(x), compiler_options=parity.FAST_COMPILE)(model, tiny.images)
  batch = contract_batch(tiny.config, tiny.images.shape[0])
  wrt = nnx.DiffState(0, partition.trainable(3))

  @functools.partial(jax.jit, static_argnames="level", compiler_options=parity.FAST_COMPILE)
  def branch_grads(model, image, level):
    def loss(m):
      return training_loss(m.ground(image, m.encode_text(tiny.tokens, level), level=level), batch)
    return nnx.grad(loss, argnums=wrt)(model)

  @functools.partial(jax.jit, compiler_options=parity.FAST_COMPILE)
  def alignment_grads(model):
    def loss(m):  # stage 3's InfoNCE and margin terms, on the projected features of both
      # branches and of the concept anchors (two examples of different concepts)
      simple, complex_, concept = [m.instruction_embedding(m.encode_text(tiny.tokens, level))
                                   for level in ("simple", "complex", "concept")]
      concept_id, valid = jnp.arange(2, dtype=jnp.int32), jnp.ones(2, bool)
      return (alignment.instance_infonce(simple, complex_, concept_id, valid) +
              alignment.concept_anchor_margin(simple, complex_, concept, concept_id, valid,
                                              margin=10.0))  # active for any features
    return nnx.grad(loss, argnums=wrt)(model)

  simple, complex_ = branch_grads(model, image, "simple"), branch_grads(model, image, "complex")
  align = alignment_grads(model)
  nonzero = lambda g: {dotted(p): bool(np.abs(np.asarray(x)).max() > 0)
                       for p, x in jax.tree_util.tree_leaves_with_path(g)}
  flags = {"simple": nonzero(simple), "complex": nonzero(complex_), "align": nonzero(align)}
  stages = {1: ("simple",), 2: ("complex",), 3: ("simple", "complex", "align")}
  for stage, sources in stages.items():
    leaves = {p for p in flags["simple"] if partition.is_trainable(p, stage)}
    assert leaves, stage
    dead = sorted(p for p in leaves if not any(flags[s][p] for s in sources))
    assert not dead, f"stage {stage}: {len(dead)} trainable leaves get no gradient, e.g. {dead[:5]}"
  # Routing: a level's loss never reaches the other level's adapters.
  assert not any(flags["simple"][p] for p in flags["simple"] if partition.is_trainable(p, 2))
  assert not any(flags["complex"][p] for p in flags["complex"] if partition.is_trainable(p, 1))


# --- migrations, levels ----------------------------------------------------------------------------
def test_migration_to_complex(tiny):
  state = perturbed(tiny.fresh, r"adapter", seed=3)  # every adapter parameter differs
  migrated = migrate_to_complex(state)
  before = dict(nnx.to_flat_state(state))
  after = dict(nnx.to_flat_state(migrated))
  assert before.keys() == after.keys()
  changed = 0
  for path, var in after.items():
    if not isinstance(var, nnx.Param):
      continue
    name = ".".join(map(str, path))
    value = np.asarray(var[...])
    if ".adapter12." in name:
      source = name.replace(".adapter12.", ".adapter1.")
      np.testing.assert_array_equal(value, before[tuple(_parts(source))][...], err_msg=name)
    elif "mask_predictor_adapter2." in name:
      np.testing.assert_array_equal(
          value, before[tuple(_parts(name.replace("adapter2", "adapter1")))][...], err_msg=name)
    elif re.search(r"\.adapter2\.(up_proj|mha_adapter\.out_proj)\.", name):
      assert not value.any(), name
    else:
      np.testing.assert_array_equal(value, before[path][...], err_msg=name)
      continue
    changed += 1
  assert changed > 0
  # The cascade now computes the S-path in the text encoder.
  model = tiny.model(migrated)
  np.testing.assert_array_equal(text_features(model, tiny.tokens, "complex"),
                                text_features(model, tiny.tokens, "simple"))
  assert parity.rel_l2(text_features(tiny.model(state), tiny.tokens, "complex"),
                       text_features(tiny.model(state), tiny.tokens, "simple")) > 1e-3


def _parts(name: str) -> list:
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def test_copy_mask_predictor(tiny):
  state = copy_mask_predictor(perturbed(tiny.fresh, r"mask_predictor", seed=4))
  flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)
          if isinstance(v, nnx.Param)}
  copies = [k for k in flat if "mask_predictor_adapter" in k]
  assert len(copies) == 2 * sum("mask_predictor." in k for k in flat) > 0
  for key in copies:
    np.testing.assert_array_equal(flat[key], flat[re.sub(r"mask_predictor_adapter\d", "mask_predictor", key)])


def test_level_parsing():
  assert parse_level("simple") is Level.SIMPLE and parse_level(Level.COMPLEX) is Level.COMPLEX
  assert Level("concept") is Level.CONCEPT and Level.SIMPLE == "simple"
  for bad in ("Simple", 2, None, "text_type_2"):
    with pytest.raises(ValueError, match="instruction level must be one of"):
      parse_level(bad)
  with pytest.raises(ValueError, match="without them"):
    parse_level("complex", has_adapters=False)
  assert parse_level("concept", has_adapters=False) is Level.CONCEPT


def test_sam3_model_rejects_adapter_levels(tiny):
  with pytest.raises(ValueError, match="adapters"):
    tiny.sam3.encode_text(tiny.tokens, "simple")
  d, length = tiny.config.d_model, tiny.config.context_length
  with pytest.raises(ValueError, match="adapters"):
    tiny.sam3.instruction_embedding(TextFeatures(jnp.zeros((1, length, d)), jnp.zeros((1, length), bool)))
  with pytest.raises(ValueError, match="instruction level"):
    tiny.model(tiny.fresh)(tiny.images, tiny.tokens, level=4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients(tiny, remat):
  """Rematerialised ViT / text blocks: the same values and gradients as without remat."""
  batch = contract_batch(tiny.config, tiny.images.shape[0])
  wrt = nnx.DiffState(0, partition.trainable(3))

  def grads(config):
    model = nnx.merge(nnx.graphdef(Sam3Image(config, rngs=nnx.Rngs(0))), tiny.moved)

    @functools.partial(jax.jit, compiler_options=parity.FAST_COMPILE)
    def run(model):
      def loss(m):
        return training_loss(m(tiny.images, tiny.tokens, level="simple"), batch)
      return nnx.value_and_grad(loss, argnums=wrt)(model)
    return run(model)

  (plain_loss, plain), (remat_loss, rematted) = grads(tiny.config), grads(
      tiny.config.replace(remat=remat))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(rematted), jax.tree.leaves(plain)):
    assert parity.rel_l2(a, b) < 1e-5  # recomputed fp32 forward: rounding-level differences
