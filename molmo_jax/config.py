"""Model configuration: one schema for every Molmo v1 variant.

A `MolmoConfig` fully describes a network (vision tower, connector, language model) and the
pre-processing that feeds it. The four released models are presets in `configs/`; tiny configs of
each family live there too. Every fact the spec marks [unverified] is a field, never a constant.

All configs are frozen dataclasses so they can be hashed, closed over by `jax.jit` and compared.
`to_dict` / `from_dict` give a JSON round trip (stored beside every checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

# Which hidden layer outputs of the ViT feed the connector. Negative values count from the end of
# the (truncated) tower, as the reference's `vit_layers` does.
DEFAULT_VIT_LAYERS = (-2, -9)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP-style ViT (the reference's olmo/image_vit.py (CLIP ViT-L/14-336))."""

  image_size: int = 336            # crop side in pixels
  patch_size: int = 14
  width: int = 1024
  num_heads: int = 16
  head_dim: int = 64
  num_layers: int = 23             # the released tower drops CLIP's 24th block
  mlp_dim: int = 4096
  activation: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
  layer_norm_eps: float = 1e-5
  use_cls_token: bool = True
  use_pre_ln: bool = True
  patch_bias: bool = False
  selected_layers: tuple[int, ...] = DEFAULT_VIT_LAYERS
  # How a from-scratch model initialises its positional table: "normal" (N(0, 0.02), CLIP's own
  # init) or "sincos2d" (fixed 2-D sine/cosine features of the patch row and column, CLS row 0),
  # which lets a small model tell patch positions apart from the first step. Converted weights
  # overwrite it either way.
  position_init: Literal["normal", "sincos2d"] = "normal"

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + int(self.use_cls_token)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  def resolved_layers(self) -> tuple[int, ...]:
    """Selected layers as non-negative block indices (0 = output of the first block)."""
    out = []
    for layer in self.selected_layers:
      idx = layer if layer >= 0 else self.num_layers + layer
      if not 0 <= idx < self.num_layers:
        raise ValueError(f"vision.selected_layers: {layer} is outside a {self.num_layers}-block tower")
      out.append(idx)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  """Vision-language connector (the reference's olmo/model.py (vision backbone: pooling and projector))."""

  pooling: Literal["attention_meanq", "none"] = "attention_meanq"
  pool_height: int = 2
  pool_width: int = 2
  pool_heads: int = 16
  pool_head_dim: int = 64
  projector_hidden: int = 18944    # H/2 of the spec: mirrors the LLM FFN width per branch
  padding_embed: Literal["pad_and_partial_pad", "none"] = "pad_and_partial_pad"


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Decoder-only language model (the reference's olmo/model.py (decoder blocks)). Dense (Qwen2, OLMo) or MoE (OLMoE)."""

  num_layers: int = 28
  d_model: int = 3584
  num_heads: int = 28
  num_kv_heads: int = 4
  head_dim: int = 128
  mlp_dim: int = 18944             # per SwiGLU branch (HF config.json stores 2x this, fused)
  norm_placement: Literal["pre", "post"] = "pre"
  norm_eps: float = 1e-6
  qk_norm: bool = False            # full-width RMSNorm on q and k before the head split
  qkv_bias: bool = False
  rope_theta: float = 1_000_000.0
  rope_max_length: int = 4096      # positions at or beyond this are an error in the reference
  vocab_size: int = 152064         # tokenizer is padded to this; image tokens are vocab_size+0..4
  embedding_size: int = 152064     # rows of the pretrained table and of the LM head
  additional_vocab_size: int = 128
  # Mixture of experts; num_experts == 0 means a dense SwiGLU MLP.
  num_experts: int = 0
  experts_per_token: int = 0
  expert_mlp_dim: int = 0
  moe_impl: Literal["ragged", "capacity"] = "ragged"
  moe_capacity_factor: float = 1.25
  moe_normalize_topk: bool = False  # the release does not renormalise the top-k weights
  moe_load_balance_weight: float = 0.0
  moe_router_z_weight: float = 0.0
  # Residual dropout on attention/MLP outputs; the "response" rate applies to answer tokens only
  # (the captioning stage used response-only dropout 0.1, fine-tuning plain dropout 0.1).
  residual_dropout: float = 0.0
  response_residual_dropout: float = 0.0

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def total_vocab(self) -> int:
    """Rows of the input embedding lookup table (pretrained + new)."""
    return self.embedding_size + self.additional_vocab_size


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Image and text pre-processing constants (the reference's olmo/data/model_preprocessor.py; olmo/data/model_preprocessor.py (token layout)). Tiny models change these freely."""

  crop_size: int = 336
  patch_size: int = 14
  pool_size: int = 2
  overlap_margins: tuple[int, int] = (4, 4)   # in patches, (left/top, right/bottom)
  max_crops: int = 12                         # high-res crops; the global view is extra
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  pad_value: float = 0.0
  resize_method: Literal["tensorflow", "torchvision"] = "tensorflow"
  use_col_tokens: bool = True
  fix_image_padding: bool = False             # reproduce the released off-by-one mask pairing
  always_start_with_space: bool = True
  # Images with alpha: "drop" = PIL convert("RGB") as the reference, or "composite" them over
  # alpha_background (RGB 0..255). See molmo_jax.preprocess.image_io.load_image.
  alpha: Literal["drop", "composite"] = "drop"
  alpha_background: tuple[int, int, int] = (0, 0, 0)
  # Text-only examples (no image): the reference's MultiModalPreprocessor returns the tokens
  # without BOS; True prepends BOS as for examples with images (and as the HF processor does).
  text_only_bos: bool = False

  @property
  def crop_patches(self) -> int:
    return self.crop_size // self.patch_size

  @property
  def pooled_per_crop(self) -> int:
    return (self.crop_patches // self.pool_size) ** 2


@dataclasses.dataclass(frozen=True)
class MolmoConfig:
  """A complete Molmo model."""

  name: str = "molmo-7b-d"
  vision: VisionConfig = VisionConfig()
  connector: ConnectorConfig = ConnectorConfig()
  llm: LLMConfig = LLMConfig()
  preprocess: PreprocessConfig = PreprocessConfig()
  dtype: str = "float32"            # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  # Layers are always scanned (stacked on a leading "layers" axis); this picks what the backward
  # pass keeps: none (no remat) | full | dots | dots_no_batch | qkv_proj | minimal.
  remat_policy: str = "none"
  # How many layers each iteration of the layer scans runs (jax.lax.scan's `unroll`); a value >=
  # the number of layers unrolls the loop completely. Changes neither the results nor the stacked
  # parameter layout, only the compiled program: on XLA:CPU a fully unrolled loop skips
  # zero-filling and copying the scan's stacked buffers (the demo recipe unrolls); accelerators
  # keep 1 (one compiled layer body, fast compiles for deep models).
  scan_unroll: int = 1

  def replace(self, **kwargs: Any) -> "MolmoConfig":
    return dataclasses.replace(self, **kwargs)

  def with_preprocess(self, **changes: Any) -> "MolmoConfig":
    """This config with PreprocessConfig fields changed (None values are left alone), e.g.
    `with_preprocess(resize_method="torchvision")`; unknown fields and values are refused."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
      return self
    fields = {f.name: f for f in dataclasses.fields(PreprocessConfig)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
      raise ValueError(f"preprocess: unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(PreprocessConfig)
    for name, value in changes.items():
      if typing.get_origin(hints[name]) is Literal and value not in typing.get_args(hints[name]):
        raise ValueError(f"preprocess.{name}: expected one of {typing.get_args(hints[name])}, "
                         f"got {value!r}")
    return self.replace(preprocess=dataclasses.replace(self.preprocess, **changes))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MolmoConfig":
    return _from_dict(cls, d, "config")

  @classmethod
  def from_json(cls, text: str) -> "MolmoConfig":
    return cls.from_dict(json.loads(text))


def _from_dict(cls, d: Any, where: str):
  if not isinstance(d, dict):
    raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
  kwargs = {}
  for name, value in d.items():
    ftype = fields[name].type
    sub = _NESTED.get((cls, name))
    if sub is not None:
      kwargs[name] = _from_dict(sub, value, f"{where}.{name}")
    elif isinstance(value, list):
      kwargs[name] = tuple(value)
    else:
      kwargs[name] = value
    del ftype
  return cls(**kwargs)


_NESTED = {
    (MolmoConfig, "vision"): VisionConfig,
    (MolmoConfig, "connector"): ConnectorConfig,
    (MolmoConfig, "llm"): LLMConfig,
    (MolmoConfig, "preprocess"): PreprocessConfig,
}


# --------------------------------------------------------------------------------------------
# Presets of the four released models (the reference's launch_scripts/utils.py (model presets); olmo/hf_molmo.py). The CLIP tower is the same everywhere.
# --------------------------------------------------------------------------------------------

def molmo_7b_d() -> MolmoConfig:
  return MolmoConfig(
      name="molmo-7b-d",
      connector=ConnectorConfig(projector_hidden=18944),
      llm=LLMConfig(num_layers=28, d_model=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                    mlp_dim=18944, norm_eps=1e-6, qkv_bias=True, rope_theta=1e6,
                    vocab_size=152064, embedding_size=152064))


def molmo_72b() -> MolmoConfig:
  return MolmoConfig(
      name="molmo-72b",
      connector=ConnectorConfig(projector_hidden=29568),
      llm=LLMConfig(num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                    mlp_dim=29568, norm_eps=1e-5, qkv_bias=True, rope_theta=1e6,
                    vocab_size=152064, embedding_size=152064))


def molmo_7b_o() -> MolmoConfig:
  return MolmoConfig(
      name="molmo-7b-o",
      connector=ConnectorConfig(projector_hidden=11008),
      llm=LLMConfig(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                    mlp_dim=11008, norm_placement="post", norm_eps=1e-6, qk_norm=True,
                    qkv_bias=False, rope_theta=5e5, vocab_size=100278, embedding_size=100352))


def molmoe_1b() -> MolmoConfig:
  return MolmoConfig(
      name="molmoe-1b",
      connector=ConnectorConfig(projector_hidden=1024),
      llm=LLMConfig(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                    mlp_dim=1024, norm_eps=1e-5, qk_norm=True, qkv_bias=False, rope_theta=1e4,
                    rope_max_length=32768, vocab_size=50280, embedding_size=50304,
                    num_experts=64, experts_per_token=8, expert_mlp_dim=1024))


# Tiny members of each family: same code paths, sizes that run in milliseconds on a CPU.
_TINY_VISION = VisionConfig(image_size=32, patch_size=4, width=32, num_heads=4, head_dim=8,
                            num_layers=3, mlp_dim=64, selected_layers=(-1, -3))
_TINY_PREPROCESS = PreprocessConfig(crop_size=32, patch_size=4, pool_size=2, overlap_margins=(2, 2),
                                    max_crops=4)


def tiny(family: Literal["qwen2", "olmo", "olmoe"] = "qwen2", **llm_overrides: Any) -> MolmoConfig:
  """A tiny random model of one family for tests (vocab 96 + 32 extra rows)."""
  common = dict(num_layers=2, d_model=64, head_dim=16, rope_max_length=512, vocab_size=90,
                embedding_size=96, additional_vocab_size=32)
  if family == "qwen2":
    llm = LLMConfig(num_heads=4, num_kv_heads=2, mlp_dim=96, qkv_bias=True, rope_theta=1e6,
                    norm_eps=1e-6, **common)
  elif family == "olmo":
    llm = LLMConfig(num_heads=4, num_kv_heads=4, mlp_dim=96, norm_placement="post", qk_norm=True,
                    rope_theta=5e5, norm_eps=1e-6, **common)
  elif family == "olmoe":
    llm = LLMConfig(num_heads=4, num_kv_heads=4, mlp_dim=32, qk_norm=True, rope_theta=1e4,
                    norm_eps=1e-5, num_experts=8, experts_per_token=2, expert_mlp_dim=32, **common)
  else:
    raise ValueError(f"unknown family {family!r}; expected qwen2, olmo or olmoe")
  llm = dataclasses.replace(llm, **llm_overrides)
  return MolmoConfig(
      name=f"tiny-{family}", vision=_TINY_VISION,
      connector=ConnectorConfig(pool_heads=4, pool_head_dim=8,
                                projector_hidden=llm.expert_mlp_dim if llm.is_moe else llm.mlp_dim),
      llm=llm, preprocess=_TINY_PREPROCESS)


PRESETS = {
    "molmo-7b-d": molmo_7b_d,
    "molmo-72b": molmo_72b,
    "molmo-7b-o": molmo_7b_o,
    "molmoe-1b": molmoe_1b,
}


def preset(name: str) -> MolmoConfig:
  try:
    return PRESETS[name]()
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
