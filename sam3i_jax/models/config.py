"""Sizes of the SAM 3 image model: one dataclass, the released sizes by default, small presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Variant:
  """What sets one released SAM 3 detector apart from another, beyond its sizes."""
  # The vision neck's branches `backbone.vision_backbone.convs.i` (the model uses the first three).
  neck_scale_factors: tuple[float, ...]
  # The reference's `supervise_joint_box_scores`: pred_logits carry the presence score,
  # clamp(inverse_sigmoid(sigmoid(logit) * sigmoid(presence)), -10, 10), so inference scores are
  # sigmoid(pred_logits) alone; otherwise they are sigmoid(logit) * sigmoid(presence).
  joint_presence_scores: bool


VARIANTS: dict[str, Variant] = {
    # sam3.pt (Nov 2025): Sam3DualViTDetNeck, whose 0.5x branch `convs.3` the image model drops.
    "sam3": Variant(neck_scale_factors=(4.0, 2.0, 1.0, 0.5), joint_presence_scores=False),
    # The detector of sam3.1_multiplex.pt (Mar 2026; build_sam3_multiplex_video_predictor):
    # Sam3TriViTDetNeck without a 0.5x branch, and supervise_joint_box_scores=True.
    "sam3.1": Variant(neck_scale_factors=(4.0, 2.0, 1.0), joint_presence_scores=True),
}


@dataclasses.dataclass(frozen=True)
class Sam3Config:
  """Every size of the SAM 3 image model. Field names follow the reference builder's arguments."""

  # Which released detector (VARIANTS): SAM 3 or SAM 3.1.
  variant: str = "sam3"
  # Vision trunk (ViTDet-style ViT).
  img_size: int = 1008
  pretrain_img_size: int = 336  # abs pos embed grid = pretrain_img_size / patch_size, tiled
  patch_size: int = 14
  vit_dim: int = 1024
  vit_depth: int = 32
  vit_heads: int = 16
  vit_mlp_ratio: float = 4.625
  window_size: int = 24
  global_att_blocks: tuple[int, ...] = (7, 15, 23, 31)
  vit_drop_path_rate: float = 0.1
  # Fusion encoder / decoder / heads.
  d_model: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048  # also the hidden size of the scoring prompt MLP
  dropout: float = 0.1
  num_enc_layers: int = 6
  num_dec_layers: int = 6
  num_queries: int = 200
  num_geo_layers: int = 3
  roi_size: int = 7
  logit_clamp: float = 12.0
  # Text encoder (CLIP-style).
  text_width: int = 1024
  text_heads: int = 16
  text_layers: int = 24
  text_mlp_ratio: int = 4
  context_length: int = 32
  vocab_size: int = 49408
  # SAM3-I's instruction adapters (model_builder.AdapterConfig); built only when `adapters`.
  adapters: bool = False
  text_adapter_heads: int = 4  # the text adapters' own attention (text_width / heads per head)
  text_adapter_bottleneck: int = 64
  text_adapter_dropout: float = 0.1  # attention dropout of the text adapters (training only)
  adapter_bottleneck: int = 64  # the fusion-encoder and decoder adapters
  # Numerics: parameters are always float32; activations in `dtype`.
  dtype: str = "float32"
  # Rematerialisation of the ViT and text-encoder blocks: "none", "full", "dots"
  # (layers.REMAT_POLICIES).
  remat: str = "none"
  # The same for the fusion-encoder and decoder layers.
  layer_remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "global_att_blocks", tuple(int(b) for b in self.global_att_blocks))
    self.validate()

  # --- derived sizes -------------------------------------------------------------------
  @property
  def grid_size(self) -> int:
    """Tokens per side of the ViT (72 for the released model)."""
    return self.img_size // self.patch_size

  @property
  def pretrain_grid_size(self) -> int:
    return self.pretrain_img_size // self.patch_size

  @property
  def mask_size(self) -> int:
    """Side of pred_masks / semantic_seg (4x the token grid: 288)."""
    return 4 * self.grid_size

  @property
  def vit_mlp_dim(self) -> int:
    return int(self.vit_dim * self.vit_mlp_ratio)

  @property
  def neck_scale_factors(self) -> tuple[float, ...]:
    return VARIANTS[self.variant].neck_scale_factors

  @property
  def joint_presence_scores(self) -> bool:
    return VARIANTS[self.variant].joint_presence_scores

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def validate(self) -> None:
    problems = []
    if self.variant not in VARIANTS:
      problems.append(f"variant must be one of {sorted(VARIANTS)}, not {self.variant!r}")
    if self.img_size % self.patch_size:
      problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    if self.pretrain_img_size % self.patch_size:
      problems.append(f"pretrain_img_size {self.pretrain_img_size} is not a multiple of patch_size")
    if self.grid_size % self.window_size:
      problems.append(f"token grid {self.grid_size} is not a multiple of window_size {self.window_size}")
    if self.vit_dim % self.vit_heads or (self.vit_dim // self.vit_heads) % 4:
      problems.append("vit_dim / vit_heads must be a multiple of 4 (2-D axial RoPE)")
    if self.d_model % self.num_heads or self.d_model % 8:
      problems.append("d_model must be divisible by num_heads and by 8 (GroupNorm(8))")
    if self.text_width % self.text_heads:
      problems.append("text_width must be divisible by text_heads")
    if self.text_width % self.text_adapter_heads:
      problems.append("text_width must be divisible by text_adapter_heads")
    if not self.global_att_blocks or max(self.global_att_blocks) != self.vit_depth - 1:
      problems.append("global_att_blocks must end with the last ViT block")
    if self.dtype not in ("float32", "bfloat16"):
      problems.append(f"dtype must be float32 or bfloat16, not {self.dtype!r}")
    for name in ("remat", "layer_remat"):
      if getattr(self, name) not in ("none", "full", "dots"):
        problems.append(f"{name} must be none, full or dots, not {getattr(self, name)!r}")
    if problems:
      raise ValueError("invalid Sam3Config: " + "; ".join(problems))

  # --- (de)serialisation -----------------------------------------------------------------
  def replace(self, **changes) -> "Sam3Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: dict) -> "Sam3Config":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown Sam3Config fields: {unknown}")
    return cls(**d)


# Presets are SAM 3; `get_preset(name, adapters=True)` gives the SAM3-I model of that size.
PRESETS: dict[str, Sam3Config] = {
    # The released SAM 3 image model (840.5M parameters; 1.15B with the SAM3-I adapters).
    "full": Sam3Config(),
    # The shrunken model of the PyTorch reference (sam3_cpu.TINY_CONFIG): 16x16 tokens, 2x2 windows.
    "tiny": Sam3Config(
        img_size=224, pretrain_img_size=112, vit_dim=128, vit_depth=4, vit_heads=4, window_size=8,
        global_att_blocks=(1, 3), d_model=64, num_heads=4, dim_feedforward=128, text_width=64,
        text_heads=4, text_layers=2, num_enc_layers=2, num_dec_layers=2, num_queries=16,
        num_geo_layers=1, text_adapter_heads=2, text_adapter_bottleneck=16, adapter_bottleneck=16),
    # A second small shape: one global block, 2 heads, odd sizes that catch layout mistakes.
    "small": Sam3Config(
        img_size=168, pretrain_img_size=56, vit_dim=96, vit_depth=3, vit_heads=3, window_size=4,
        global_att_blocks=(2,), d_model=32, num_heads=2, dim_feedforward=48, text_width=48,
        text_heads=2, text_layers=3, num_enc_layers=1, num_dec_layers=3, num_queries=8,
        num_geo_layers=2, text_adapter_heads=3, text_adapter_bottleneck=12, adapter_bottleneck=8),
}


def get_preset(name: str, **overrides) -> Sam3Config:
  if name not in PRESETS:
    raise ValueError(f"unknown Sam3Config preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
