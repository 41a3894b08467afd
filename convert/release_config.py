"""config.json / preprocessor_config.json of the Molmo releases <-> MolmoConfig (the reference's olmo/hf_molmo.py (model settings); released config.json).

Two schemas:
  dense ("molmo" remote code; 7B-D, 72B, 7B-O): HF-style LLM keys (hidden_size, intermediate_size
    = the FUSED up+gate width, ...). The remote code hard-codes the vision tower, connector and
    cropping; those release values are our VisionConfig / ConnectorConfig / PreprocessConfig
    defaults.
  flat ("molmoe" remote code; MolmoE-1B): every native ModelConfig field, OLMo-style (d_model,
    n_heads, mlp_ratio, moe_*, a `vision_backbone` block, vit_layers, crop_mode, ...).

Native-style keys (`vision_backbone`, `vit_layers`, `image_pooling_2d`, `max_crops`,
`fix_image_padding`, `pad_value`, `block_type`, `max_sequence_length`, ...) are read in either
schema, so small test checkpoints and configs written by the native code load the same way; an
LLM setting given under both schemas' names (`hidden_size` and `d_model`, ...) must agree.
Pre-processing comes from preprocessor_config.json when present. Every key is mapped, checked
against the values we implement (MUST_EQUAL), or a known training/prompting knob (IGNORED);
anything else, and any value we do not implement, is an error naming the key.
Export writes the release schema and adds native keys only where our config differs from the
release defaults, so a released config.json round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from convert.tables.molmo_release import (DENSE_FIXED, DENSE_MAPPED, FLAT_MAPPED, FLAT_RELEASE,
                                          IGNORED, LLM_ALIASES, MOE_KEYS, MUST_EQUAL, NATIVE_MAPPED,
                                          PREPROCESSOR_IGNORED, PREPROCESSOR_MAPPED,
                                          PREPROCESSOR_RELEASE_EXTRA, VISION_MAPPED,
                                          VISION_RELEASE_EXTRA)
from molmo_jax.config import (PRESETS, ConnectorConfig, LLMConfig, MolmoConfig, PreprocessConfig,
                              VisionConfig)

_POOLING = {"attention-meanq": "attention_meanq", "attention_meanq": "attention_meanq", "none": "none"}
_PADDING = {"pad_and_partial_pad": "pad_and_partial_pad", None: "none"}
_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


def _check_keys(d: dict[str, Any], mapped, where: str, ignored=IGNORED) -> None:
  if "quantization_config" in d:
    raise ValueError(f"{where}: quantized checkpoints (quantization_config) are not supported; "
                     "convert the original float weights")
  unknown = sorted(k for k in d if k not in mapped and k not in MUST_EQUAL and k not in ignored)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; this converter does not know what they "
                     "change in the model")
  for key, allowed in MUST_EQUAL.items():
    if key in d and not any(d[key] is v or (d[key] == v and type(d[key]) is type(v)) for v in allowed):
      raise ValueError(f"{where}: {key}={d[key]!r} is not supported; expected one of {list(allowed)}")


def _need(d: dict[str, Any], key: str, where: str, kind=(int,)):
  if key not in d or d[key] is None:
    raise ValueError(f"{where}: missing required key {key!r}")
  value = d[key]
  if not isinstance(value, kind) or isinstance(value, bool) != (kind == (bool,)):
    raise ValueError(f"{where}: {key} must be {'/'.join(k.__name__ for k in kind)}, got {value!r}")
  return value


def _opt(d: dict[str, Any], key: str, default):
  value = d.get(key)
  return default if value is None else value


def _pair(value, key: str, where: str) -> tuple[int, int]:
  if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
    raise ValueError(f"{where}: {key} must be a pair of ints, got {value!r}")
  return tuple(value)


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------

def schema_of(hf: dict[str, Any], where: str = "config.json") -> str:
  """'dense' or 'flat'; raises if this is not a Molmo release config."""
  if hf.get("model_type") != "molmo":
    raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not a Molmo release "
                     "(expected 'molmo')")
  if "d_model" in hf:
    return "flat"
  if "hidden_size" in hf:
    return "dense"
  raise ValueError(f"{where}: neither hidden_size (Molmo schema) nor d_model (MolmoE schema)")


def _vision(block: Any, vit_layers: Any, where: str) -> VisionConfig:
  base = VisionConfig()
  if vit_layers is not None and not (isinstance(vit_layers, list) and vit_layers and
                                     all(isinstance(v, int) for v in vit_layers)):
    raise ValueError(f"{where}: vit_layers must be a non-empty list of ints, got {vit_layers!r}")
  selected = tuple(vit_layers) if vit_layers is not None else base.selected_layers
  if block is None:
    return dataclasses.replace(base, selected_layers=selected)
  w = f"{where}: vision_backbone"
  if not isinstance(block, dict):
    raise ValueError(f"{w}: expected an object, got {block!r}")
  _check_keys(block, VISION_MAPPED, w, ignored=frozenset(VISION_RELEASE_EXTRA))
  if block.get("image_model_type", "openai") != "openai":
    raise ValueError(f"{w}: image_model_type {block['image_model_type']!r} is not supported "
                     "(only the CLIP-style 'openai' tower)")
  if block.get("resize_mode", "default") != "default":
    raise ValueError(f"{w}: resize_mode {block['resize_mode']!r} is not supported; expected 'default'")
  size = _pair(block.get("image_default_input_size", [base.image_size] * 2),
               "image_default_input_size", w)
  if size[0] != size[1]:
    raise ValueError(f"{w}: image_default_input_size {list(size)} must be square")
  activation = block.get("image_mlp_activations", base.activation)
  if activation not in _ACTIVATIONS:
    raise ValueError(f"{w}: image_mlp_activations {activation!r} unknown; expected {_ACTIVATIONS}")
  v = VisionConfig(
      image_size=size[0], patch_size=block.get("image_patch_size", base.patch_size),
      width=block.get("image_emb_dim", base.width), num_heads=block.get("image_num_heads", base.num_heads),
      head_dim=block.get("image_head_dim", base.head_dim),
      num_layers=block.get("image_num_layers", base.num_layers),
      mlp_dim=block.get("image_mlp_dim", base.mlp_dim), activation=activation,
      layer_norm_eps=float(block.get("image_norm_eps", base.layer_norm_eps)), selected_layers=selected)
  checks = {"image_pos_patch_size": v.patch_size, "image_num_key_value_heads": v.num_heads,
            "image_num_pos": v.num_positions}
  for key, want in checks.items():
    if key in block and block[key] != want:
      raise ValueError(f"{w}: {key}={block[key]!r} is not supported; this tower needs {want}")
  return v


def _dense_llm(hf: dict[str, Any], where: str) -> tuple[LLMConfig, int]:
  d = _need(hf, "hidden_size", where)
  heads = _need(hf, "num_attention_heads", where)
  fused = _need(hf, "intermediate_size", where)
  if fused % 2:
    raise ValueError(f"{where}: intermediate_size {fused} must be even (it is the fused up+gate width)")
  head_dim = _opt(hf, "head_dim", d // heads)
  vocab = _need(hf, "vocab_size", where)
  llm = LLMConfig(
      num_layers=_need(hf, "num_hidden_layers", where), d_model=d, num_heads=heads,
      num_kv_heads=_opt(hf, "num_key_value_heads", heads), head_dim=head_dim, mlp_dim=fused // 2,
      norm_placement="post" if _need(hf, "norm_after", where, (bool,)) else "pre",
      norm_eps=float(_need(hf, "layer_norm_eps", where, (int, float))),
      qk_norm=_need(hf, "attention_layer_norm", where, (bool,)),
      qkv_bias=_need(hf, "qkv_bias", where, (bool,)),
      rope_theta=float(_need(hf, "rope_theta", where, (int, float))),
      rope_max_length=_rope_length(hf, where), vocab_size=vocab,
      embedding_size=_opt(hf, "embedding_size", vocab),
      additional_vocab_size=_opt(hf, "additional_vocab_size", 128), **_dropouts(hf, where))
  return llm, fused // 2


def _rope_length(hf: dict[str, Any], where: str) -> int:
  """The RoPE table length: max_position_embeddings, else (as the native code) max_sequence_length.
  max_sequence_length alone only bounds training sequences, so any positive value is accepted."""
  if hf.get("max_sequence_length") is not None:
    _need(hf, "max_sequence_length", where)
    if hf["max_sequence_length"] < 1:
      raise ValueError(f"{where}: max_sequence_length must be positive, got "
                       f"{hf['max_sequence_length']!r}")
  if hf.get("max_position_embeddings") is not None:
    return _need(hf, "max_position_embeddings", where)
  if hf.get("max_sequence_length") is not None:
    return hf["max_sequence_length"]
  raise ValueError(f"{where}: missing required key 'max_position_embeddings' (or the native "
                   "max_sequence_length)")


def _dropouts(hf: dict[str, Any], where: str) -> dict[str, float]:
  out = {}
  for key in ("residual_dropout", "response_residual_dropout"):
    value = hf.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f"{where}: {key} must be a number in [0, 1), got {value!r}")
    out[key] = float(value)
  return out


def _check_block_type(hf: dict[str, Any], schema: str, where: str) -> str:
  block_type = hf.get("block_type", "sequential")
  allowed = ("sequential",) if schema == "dense" else ("sequential", "moe")
  if block_type not in allowed:
    hint = (" (MoE models use the MolmoE schema: d_model, moe_num_experts, ...)"
            if block_type == "moe" else "")
    raise ValueError(f"{where}: block_type={block_type!r} is not supported in the {schema} "
                     f"schema; expected one of {list(allowed)}{hint}")
  return block_type


def _check_aliases(hf: dict[str, Any], schema: str, llm: LLMConfig, fused: int,
                   where: str) -> None:
  """The other schema's name of an LLM setting must give the value this schema's key gave."""
  ours = {"hidden_size": llm.d_model, "num_hidden_layers": llm.num_layers,
          "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
          "intermediate_size": fused}
  for dense_key, flat_key in LLM_ALIASES:
    own, other = (dense_key, flat_key) if schema == "dense" else (flat_key, dense_key)
    if hf.get(other) is None:   # native None: "derive it" (n_kv_heads = n_heads, ...)
      continue
    if hf[other] != ours[dense_key] or isinstance(hf[other], bool):
      raise ValueError(f"{where}: {other}={hf[other]!r} disagrees with {own} (which gives "
                       f"{ours[dense_key]!r}); give one value")
  ratio = hf.get("mlp_ratio")
  if schema == "dense" and ratio is not None and hf.get("mlp_hidden_size") is None \
      and ratio * llm.d_model != fused:
    raise ValueError(f"{where}: mlp_ratio={ratio!r} x hidden_size {llm.d_model} disagrees with "
                     f"intermediate_size {fused}; give one value")


def _flat_llm(hf: dict[str, Any], where: str) -> tuple[LLMConfig, int]:
  d = _need(hf, "d_model", where)
  heads = _need(hf, "n_heads", where)
  hidden = hf.get("mlp_hidden_size") or _need(hf, "mlp_ratio", where) * d
  vocab = _need(hf, "vocab_size", where)
  block_type = _check_block_type(hf, "flat", where)
  rope_len = _rope_length(hf, where)
  fields = dict(
      num_layers=_need(hf, "n_layers", where), d_model=d, num_heads=heads,
      num_kv_heads=_opt(hf, "n_kv_heads", heads), head_dim=_opt(hf, "head_dim", d // heads),
      mlp_dim=hidden // 2, norm_placement="post" if hf.get("norm_after", False) else "pre",
      norm_eps=float(_need(hf, "layer_norm_eps", where, (int, float))),
      qk_norm=bool(hf.get("attention_layer_norm", False)), qkv_bias=bool(hf.get("qkv_bias", False)),
      rope_theta=float(_need(hf, "rope_theta", where, (int, float))), rope_max_length=rope_len,
      vocab_size=vocab, embedding_size=_opt(hf, "embedding_size", vocab),
      additional_vocab_size=_need(hf, "additional_vocab_size", where), **_dropouts(hf, where))
  if block_type == "moe":
    fields.update(num_experts=_need(hf, "moe_num_experts", where),
                  experts_per_token=_need(hf, "moe_top_k", where), expert_mlp_dim=hidden // 2,
                  moe_impl="ragged" if hf.get("moe_dropless", True) else "capacity",
                  moe_capacity_factor=float(_opt(hf, "moe_capacity_factor", 1.25)),
                  moe_load_balance_weight=float(_opt(hf, "moe_loss_weight", 0.0)),
                  moe_router_z_weight=float(_opt(hf, "moe_zloss_weight", 0.0)))
  return LLMConfig(**fields), hidden // 2


def _preprocess(hf: dict[str, Any], pre: dict[str, Any] | None, vision: VisionConfig, pool: int,
                where: str) -> PreprocessConfig:
  base = PreprocessConfig()
  fields: dict[str, Any] = dict(crop_size=vision.image_size, patch_size=vision.patch_size,
                                pool_size=pool)
  for key in ("max_crops", "use_col_tokens", "always_start_with_space"):
    if key in hf:
      fields[key] = hf[key]
  if hf.get("fix_image_padding") is not None:
    fields["fix_image_padding"] = _need(hf, "fix_image_padding", where, (bool,))
  if hf.get("pad_value") is not None:
    fields["pad_value"] = float(_need(hf, "pad_value", where, (int, float)))
  if "overlap_margins" in hf:
    fields["overlap_margins"] = _pair(hf["overlap_margins"], "overlap_margins", where)
  if pre is not None:
    w = f"{where} + preprocessor_config.json"
    _check_keys(pre, PREPROCESSOR_MAPPED, w, ignored=PREPROCESSOR_IGNORED)
    if pre.get("do_normalize", True) is not True or pre.get("image_padding_mask", True) is not True:
      raise ValueError(f"{w}: do_normalize and image_padding_mask must be true (as released)")
    from_pre = {"max_crops": pre.get("max_crops"),
                "overlap_margins": pre.get("overlap_margins") and _pair(pre["overlap_margins"],
                                                                         "overlap_margins", w),
                "crop_size": pre.get("base_image_input_size") and _pair(
                    pre["base_image_input_size"], "base_image_input_size", w)[0],
                "patch_size": pre.get("image_patch_size"),
                "image_mean": pre.get("image_mean") and tuple(pre["image_mean"]),
                "image_std": pre.get("image_std") and tuple(pre["image_std"])}
    for key, value in from_pre.items():
      if value is None:
        continue
      if key in fields and fields[key] != value:
        raise ValueError(f"{w}: {key} is {fields[key]!r} in config.json (or the vision tower) but "
                         f"{value!r} in preprocessor_config.json")
      fields[key] = value
    tokens = -(-(fields["crop_size"] // fields["patch_size"]) // pool)
    for key in ("image_token_length_h", "image_token_length_w"):
      if key in pre and pre[key] != tokens:
        raise ValueError(f"{w}: {key}={pre[key]} but {fields['crop_size']} px crops of "
                         f"{fields['patch_size']} px patches pooled {pool}x{pool} give {tokens}")
  return dataclasses.replace(base, **fields)


def config_from_release(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                        name: str | None = None, where: str = "config.json") -> MolmoConfig:
  schema = schema_of(hf, where)
  _check_keys(hf, DENSE_MAPPED + FLAT_MAPPED + NATIVE_MAPPED + MOE_KEYS, where)
  if schema == "dense":
    _check_block_type(hf, schema, where)
  llm, projector_hidden = (_dense_llm if schema == "dense" else _flat_llm)(hf, where)
  _check_aliases(hf, schema, llm, 2 * projector_hidden, where)
  vision = _vision(hf.get("vision_backbone"), hf.get("vit_layers"), where)
  vision.resolved_layers()
  pooling = _POOLING.get(hf.get("image_pooling_2d", "attention-meanq"))
  padding = _PADDING.get(hf.get("image_padding_embed", "pad_and_partial_pad"), "bad")
  if pooling is None or padding == "bad":
    raise ValueError(f"{where}: image_pooling_2d {hf.get('image_pooling_2d')!r} / image_padding_embed "
                     f"{hf.get('image_padding_embed')!r} not supported; expected {list(_POOLING)} / "
                     f"{list(_PADDING)}")
  pool_h, pool_w = hf.get("image_pooling_h", 2), hf.get("image_pooling_w", 2)
  if pool_h != pool_w:
    raise ValueError(f"{where}: image_pooling_h {pool_h} != image_pooling_w {pool_w} is not supported")
  connector = ConnectorConfig(pooling=pooling, pool_height=pool_h, pool_width=pool_w,
                              pool_heads=vision.num_heads, pool_head_dim=vision.head_dim,
                              projector_hidden=projector_hidden, padding_embed=padding)
  cfg = MolmoConfig(vision=vision, connector=connector, llm=llm,
                    preprocess=_preprocess(hf, preprocessor, vision, pool_h, where))
  return cfg.replace(name=name or _preset_name(cfg) or "molmo")


def _preset_name(cfg: MolmoConfig) -> str | None:
  """The preset this network is (training-only dropout rates aside), if any."""
  def network(c: MolmoConfig) -> MolmoConfig:
    llm = dataclasses.replace(c.llm, residual_dropout=0.0, response_residual_dropout=0.0)
    return c.replace(name="", llm=llm)
  for preset_name, make in PRESETS.items():
    if network(make()) == network(cfg):
      return preset_name
  return None


def config_from_release_dir(hf_dir: str | Path, name: str | None = None) -> MolmoConfig:
  hf_dir = Path(hf_dir)
  path = hf_dir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Molmo release directory)")
  hf = _read_json(path)
  pre_path = hf_dir / "preprocessor_config.json"
  pre = _read_json(pre_path) if pre_path.is_file() else None
  cfg = config_from_release(hf, pre, name=name, where=str(path))
  return cfg if name or cfg.name != "molmo" else cfg.replace(name=hf_dir.name)


def _read_json(path: Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------

def _exportable(cfg: MolmoConfig) -> None:
  """Settings the release files cannot express."""
  v, c, p, base_v, base_p = cfg.vision, cfg.connector, cfg.preprocess, VisionConfig(), PreprocessConfig()
  problems = []
  if (v.use_cls_token, v.use_pre_ln, v.patch_bias) != (base_v.use_cls_token, base_v.use_pre_ln,
                                                       base_v.patch_bias):
    problems.append("vision.use_cls_token/use_pre_ln/patch_bias differ from the CLIP tower")
  if (c.pool_heads, c.pool_head_dim) != (v.num_heads, v.head_dim):
    problems.append("connector pooling heads must equal the ViT heads")
  if c.pool_height != c.pool_width:
    problems.append("connector pooling must be square")
  if (p.crop_size, p.patch_size, p.pool_size) != (v.image_size, v.patch_size, c.pool_height):
    problems.append("preprocess crop/patch/pool sizes must match the vision tower and connector")
  for key in ("pad_value", "resize_method", "fix_image_padding"):
    if getattr(p, key) != getattr(base_p, key):
      problems.append(f"preprocess.{key}={getattr(p, key)!r} (the release processor has "
                      f"{getattr(base_p, key)!r})")
  want_projector = cfg.llm.expert_mlp_dim if cfg.llm.is_moe else cfg.llm.mlp_dim
  if c.projector_hidden != want_projector:
    problems.append(f"connector.projector_hidden {c.projector_hidden} must equal the LLM MLP width "
                    f"{want_projector}")
  if problems:
    raise ValueError(f"config {cfg.name!r} cannot be written as a Molmo release: " + "; ".join(problems))


def vision_backbone_block(v: VisionConfig) -> dict[str, Any]:
  return dict(sorted({
      **VISION_RELEASE_EXTRA, "image_default_input_size": [v.image_size, v.image_size],
      "image_emb_dim": v.width, "image_head_dim": v.head_dim, "image_mlp_activations": v.activation,
      "image_mlp_dim": v.mlp_dim, "image_model_type": "openai", "image_norm_eps": v.layer_norm_eps,
      "image_num_heads": v.num_heads, "image_num_key_value_heads": v.num_heads,
      "image_num_layers": v.num_layers, "image_num_pos": v.num_positions,
      "image_patch_size": v.patch_size, "image_pos_patch_size": v.patch_size,
      "resize_mode": "default"}.items()))


def _native_keys(cfg: MolmoConfig) -> dict[str, Any]:
  """Native-style values of our config that export writes where they differ from a release's
  (pad_value / fix_image_padding / the resize cannot be expressed for the remote code: see
  `_exportable`; block_type and max_sequence_length follow from the schema)."""
  v, c, p, m = cfg.vision, cfg.connector, cfg.preprocess, cfg.llm
  return {"vision_backbone": vision_backbone_block(v), "vit_layers": list(v.selected_layers),
          "image_pooling_2d": "attention-meanq" if c.pooling == "attention_meanq" else "none",
          "image_pooling_h": c.pool_height, "image_pooling_w": c.pool_width,
          "image_padding_embed": None if c.padding_embed == "none" else c.padding_embed,
          "max_crops": p.max_crops, "overlap_margins": list(p.overlap_margins),
          "use_col_tokens": p.use_col_tokens, "always_start_with_space": p.always_start_with_space,
          "additional_vocab_size": m.additional_vocab_size, "head_dim": m.head_dim,
          "residual_dropout": m.residual_dropout,
          "response_residual_dropout": m.response_residual_dropout}


def release_config_json(cfg: MolmoConfig, torch_dtype: str) -> dict[str, Any]:
  """config.json for `cfg`: the dense schema, or the flat MolmoE schema for MoE models."""
  _exportable(cfg)
  m = cfg.llm
  ours = _native_keys(cfg)
  if m.is_moe:
    return dict(sorted(_flat_keys(cfg, ours, torch_dtype).items()))
  release = _native_keys(MolmoConfig(llm=dataclasses.replace(
      m, additional_vocab_size=128, head_dim=m.d_model // m.num_heads, residual_dropout=0.0,
      response_residual_dropout=0.0)))
  out = {**DENSE_FIXED, "attention_layer_norm": m.qk_norm, "embedding_size": m.embedding_size,
         "hidden_size": m.d_model, "intermediate_size": 2 * m.mlp_dim,
         "layer_norm_eps": m.norm_eps, "max_position_embeddings": m.rope_max_length,
         "norm_after": m.norm_placement == "post", "num_attention_heads": m.num_heads,
         "num_hidden_layers": m.num_layers, "num_key_value_heads": m.num_kv_heads,
         "qkv_bias": m.qkv_bias, "rope_theta": m.rope_theta, "torch_dtype": torch_dtype,
         "vocab_size": m.vocab_size}
  # max_crops / overlap_margins live in preprocessor_config.json for this schema.
  out.update({k: v for k, v in ours.items()
              if v != release[k] and k not in ("max_crops", "overlap_margins")})
  return dict(sorted(out.items()))


def _flat_keys(cfg: MolmoConfig, ours: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
  m = cfg.llm
  hidden = 2 * m.expert_mlp_dim
  out = {**FLAT_RELEASE, **ours, "torch_dtype": torch_dtype,
         "attention_layer_norm": m.qk_norm, "d_model": m.d_model, "embedding_size": m.embedding_size,
         "head_dim": None if m.head_dim * m.num_heads == m.d_model else m.head_dim,
         "layer_norm_eps": m.norm_eps, "max_position_embeddings": m.rope_max_length,
         "moe_capacity_factor": m.moe_capacity_factor, "moe_dropless": m.moe_impl == "ragged",
         "moe_loss_weight": m.moe_load_balance_weight, "moe_num_experts": m.num_experts,
         "moe_top_k": m.experts_per_token, "moe_zloss_weight": m.moe_router_z_weight,
         "n_heads": m.num_heads, "n_kv_heads": None if m.num_kv_heads == m.num_heads else m.num_kv_heads,
         "n_layers": m.num_layers, "norm_after": m.norm_placement == "post", "qkv_bias": m.qkv_bias,
         "residual_dropout": m.residual_dropout, "response_residual_dropout": m.response_residual_dropout,
         "rope_theta": m.rope_theta, "vocab_size": m.vocab_size}
  if hidden % m.d_model == 0:
    out.update(mlp_ratio=hidden // m.d_model, mlp_hidden_size=None)
  else:
    out.update(mlp_hidden_size=hidden)
  return out


def preprocessor_config_json(cfg: MolmoConfig, existing: dict[str, Any] | None = None) -> dict[str, Any]:
  """preprocessor_config.json: an existing one (e.g. carried in tokenizer/) updated with our values."""
  p = cfg.preprocess
  tokens = -(-p.crop_patches // p.pool_size)
  out = {**PREPROCESSOR_RELEASE_EXTRA, **(existing or {}),
         "base_image_input_size": [p.crop_size, p.crop_size], "do_normalize": True,
         "image_mean": list(p.image_mean), "image_padding_mask": True,
         "image_patch_size": p.patch_size, "image_std": list(p.image_std),
         "image_token_length_h": tokens, "image_token_length_w": tokens, "max_crops": p.max_crops,
         "overlap_margins": list(p.overlap_margins)}
  return dict(sorted(out.items()))
