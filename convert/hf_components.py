"""HF base components (CLIP, Qwen2, OLMo2, OLMoE) -> our parameter tree (the reference's olmo/image_vit.py (CLIP ViT-L/14-336); olmo/model.py (decoder blocks); scripts/convert_hf_to_molmo.py).

Legend: L layers, E experts, D LLM width, H query heads, K kv heads, h head dim, F MLP width,
V HF vocab rows, Dv ViT width, Hv/hv ViT heads/head dim, Fv ViT MLP width, p patch side.

Conversion is table-driven. Each `Rule` names one leaf of our tree, the HF tensor it comes from
(`{i}` = layer, `{e}` = expert), the HF shape the config implies, our shape, and a small
transform hook. Per-layer (and per-expert) tensors are stacked on a leading axis, so the result
is already in the scanned layout.

  torch Linear [out, in]  --linear-->  [in, *out]   (q/k/v: [D, H, h]; o_proj [D, H*h] -> [H, h, D])
  CLIP conv [Dv, 3, p, p] --permute (0,2,3,1), flatten, transpose--> [p*p*3, Dv] ((dy, dx, c) order)
  fused experts gate_up_proj [E, 2F, D] -> gate/up [E, D, F]; down_proj [E, D, F] -> [E, F, D]

Every tensor of a checkpoint is accounted for: converted, deliberately dropped (CLIP's last block
and post-LN when the tower is truncated), or outside the component (CLIPModel's text tower).
Anything else is an error, as is a missing tensor or a shape that disagrees with config.json.
Weights are read with convert.safetensors_io (the one reader of every converter: memory-mapped,
bfloat16 included, no torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from convert.safetensors_io import SafetensorsDir
from molmo_jax.config import LLMConfig, VisionConfig

Params = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# --------------------------------------------------------------------------------------------


def read_hf_config(directory: str | Path) -> dict[str, Any]:
  path = Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model dir)")
  return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

_VIT_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_new": "gelu_tanh"}
LLM_FAMILIES = ("qwen2", "olmo2", "olmoe")


def clip_vision_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
  """The vision part of a CLIPModel ("clip") or CLIPVisionModel ("clip_vision_model") config."""
  model_type = hf.get("model_type")
  if model_type == "clip":
    return hf["vision_config"]
  if model_type == "clip_vision_model":
    return hf
  raise ValueError(f"CLIP config: model_type {model_type!r} is not supported; expected 'clip' or "
                   "'clip_vision_model'")


def vision_config_from_hf(hf: dict[str, Any], *, drop_last_layer: bool = True,
                          selected_layers: tuple[int, ...] | None = None) -> VisionConfig:
  """VisionConfig of a CLIP tower. Molmo drops CLIP's last block (23 of 24 kept, the reference's olmo/image_vit.py (CLIP ViT-L/14-336))."""
  v = clip_vision_hf_config(hf)
  act = v.get("hidden_act", "quick_gelu")
  if act not in _VIT_ACTIVATIONS:
    raise ValueError(f"CLIP config: hidden_act {act!r} unsupported; expected one of "
                     f"{sorted(_VIT_ACTIVATIONS)}")
  if v.get("num_channels", 3) != 3:
    raise ValueError(f"CLIP config: num_channels {v['num_channels']} unsupported; expected 3")
  width, heads = v["hidden_size"], v["num_attention_heads"]
  if width % heads or v["image_size"] % v["patch_size"]:
    raise ValueError(f"CLIP config: hidden_size {width} must divide by num_attention_heads {heads} "
                     f"and image_size {v['image_size']} by patch_size {v['patch_size']}")
  layers = v["num_hidden_layers"] - int(drop_last_layer)
  if layers < 1:
    raise ValueError(f"CLIP config: num_hidden_layers {v['num_hidden_layers']} leaves no block")
  cfg = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=width,
                     num_heads=heads, head_dim=width // heads, num_layers=layers,
                     mlp_dim=v["intermediate_size"], activation=_VIT_ACTIVATIONS[act],
                     layer_norm_eps=v.get("layer_norm_eps", 1e-5), use_cls_token=True,
                     use_pre_ln=True, patch_bias=False)
  if selected_layers is not None:
    cfg = dataclasses.replace(cfg, selected_layers=tuple(selected_layers))
  cfg.resolved_layers()   # a clear error now rather than at the first forward pass
  return cfg


def _rope_theta(hf: dict[str, Any], where: str) -> float:
  """RoPE base from v5 `rope_parameters` or the older `rope_theta`; scaled RoPE is refused."""
  params = hf.get("rope_parameters") or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"{where}: rope_parameters.rope_type {rope_type!r} unsupported; only plain "
                     "RoPE")
  if hf.get("rope_scaling"):
    raise ValueError(f"{where}: rope_scaling {hf['rope_scaling']!r} unsupported; only plain RoPE")
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor != 1 unsupported")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise ValueError(f"{where}: no rope_theta in rope_parameters or at the top level")
  return float(theta)


def _refuse_unsupported(hf: dict[str, Any], where: str) -> None:
  problems = []
  if hf.get("tie_word_embeddings", False):
    problems.append("tie_word_embeddings=true (Molmo's LM head is untied)")
  if hf.get("use_sliding_window", False):
    problems.append("use_sliding_window=true (attention must be global)")
  other_layers = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
  if other_layers:
    problems.append(f"layer_types {other_layers} (only full_attention)")
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU needs silu)")
  if hf.get("model_type") != "qwen2" and hf.get("attention_bias", False):
    problems.append("attention_bias=true (OLMo-family attention has no biases here)")
  if hf.get("clip_qkv") is not None:
    problems.append(f"clip_qkv={hf['clip_qkv']} (q/k/v clamping is not implemented)")
  if problems:
    raise ValueError(f"{where}: unsupported setting(s): " + "; ".join(problems))


def llm_config_from_hf(hf: dict[str, Any], **overrides: Any) -> LLMConfig:
  """LLMConfig of a Qwen2 / OLMo2 / OLMoE config.json; `overrides` replace fields afterwards
  (e.g. Molmo's own vocab_size, embedding_size, rope_max_length)."""
  family = hf.get("model_type")
  where = f"LLM config ({family})"
  if family not in LLM_FAMILIES:
    raise ValueError(f"LLM config: model_type {family!r} is not supported; expected one of "
                     f"{list(LLM_FAMILIES)}")
  _refuse_unsupported(hf, where)
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of "
                     f"num_key_value_heads {kv_heads}")
  if family == "olmoe" and head_dim * heads != d:
    raise ValueError(f"{where}: head_dim {head_dim} x heads {heads} != hidden_size {d}; OLMoE's "
                     "q_norm is hidden_size wide")
  fields = dict(
      num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=hf["intermediate_size"], norm_placement="post" if family == "olmo2" else "pre",
      norm_eps=hf["rms_norm_eps"], qk_norm=family in ("olmo2", "olmoe"),
      qkv_bias=family == "qwen2", rope_theta=_rope_theta(hf, where),
      rope_max_length=hf.get("max_position_embeddings", 4096),
      vocab_size=hf["vocab_size"], embedding_size=hf["vocab_size"])
  if family == "olmoe":
    fields.update(num_experts=hf["num_experts"], experts_per_token=hf["num_experts_per_tok"],
                  expert_mlp_dim=hf["intermediate_size"],
                  moe_normalize_topk=bool(hf.get("norm_topk_prob", False)))
  fields.update(overrides)
  return LLMConfig(**fields)


# --------------------------------------------------------------------------------------------
# Rules and transform hooks
# --------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def reshape(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  return x.reshape(dst)


def linear(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  """torch Linear weight [out, in] -> our kernel [in, ...] (head split or merge by reshape)."""
  return x.T.reshape(dst)


def patch_conv(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  """[Dv, 3, p, p] -> [p*p*3, Dv], rows in (dy, dx, c) order like our flattened patches."""
  return x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1).T.reshape(dst)


def fused_expert_gate(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  """gate_up_proj [E, 2F, D]: HF chunks the output as (gate, up) -> gate [E, D, F]."""
  return x[:, :dst[-1], :].transpose(0, 2, 1)


def fused_expert_up(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  return x[:, dst[-1]:, :].transpose(0, 2, 1)


def expert_linear(x: np.ndarray, dst: tuple[int, ...]) -> np.ndarray:
  """Fused expert matrices in torch layout [E, out, in] -> [E, in, out]."""
  return x.transpose(0, 2, 1).reshape(dst)


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str                     # our leaf, "/"-separated, relative to the component
  source: str                     # HF tensor name; {i} = layer, {e} = expert
  src_shape: tuple[int, ...]      # HF shape of one tensor (one layer, one expert)
  dst_shape: tuple[int, ...]      # our shape before stacking
  transform: Transform = reshape


def _lin(target: str, source: str, d_in: int, out: tuple[int, ...]) -> Rule:
  """Linear whose input is a plain axis and whose output may be split into heads."""
  return Rule(target, source, (math.prod(out), d_in), (d_in, *out), linear)


def _lin_out(target: str, source: str, inp: tuple[int, ...], d_out: int) -> Rule:
  """Linear whose input is (heads, head_dim), e.g. the attention output projection."""
  return Rule(target, source, (d_out, math.prod(inp)), (*inp, d_out), linear)


def _vec(target: str, source: str, shape: tuple[int, ...]) -> Rule:
  return Rule(target, source, (math.prod(shape),), shape, reshape)


def clip_rules(cfg: VisionConfig, prefix: str) -> list[Rule]:
  """CLIP vision tower -> params["vision"] (the reference's scripts/convert_hf_to_molmo.py)."""
  dv, nh, hd, p = cfg.width, cfg.num_heads, cfg.head_dim, cfg.patch_size
  layer = prefix + "encoder.layers.{i}."
  rules = [
      Rule("patch_embed/kernel", prefix + "embeddings.patch_embedding.weight", (dv, 3, p, p),
           (cfg.patch_dim, dv), patch_conv),
      _vec("class_embedding", prefix + "embeddings.class_embedding", (dv,)),
      Rule("positional_embedding", prefix + "embeddings.position_embedding.weight",
           (cfg.num_positions, dv), (cfg.num_positions, dv)),
      _vec("pre_ln/scale", prefix + "pre_layrnorm.weight", (dv,)),
      _vec("pre_ln/bias", prefix + "pre_layrnorm.bias", (dv,)),
      _vec("blocks/attention_norm/scale", layer + "layer_norm1.weight", (dv,)),
      _vec("blocks/attention_norm/bias", layer + "layer_norm1.bias", (dv,)),
      _vec("blocks/ffn_norm/scale", layer + "layer_norm2.weight", (dv,)),
      _vec("blocks/ffn_norm/bias", layer + "layer_norm2.bias", (dv,)),
      _lin_out("blocks/attention/out/kernel", layer + "self_attn.out_proj.weight", (nh, hd), dv),
      _vec("blocks/attention/out/bias", layer + "self_attn.out_proj.bias", (dv,)),
      _lin("blocks/fc1/kernel", layer + "mlp.fc1.weight", dv, (cfg.mlp_dim,)),
      _vec("blocks/fc1/bias", layer + "mlp.fc1.bias", (cfg.mlp_dim,)),
      _lin("blocks/fc2/kernel", layer + "mlp.fc2.weight", cfg.mlp_dim, (dv,)),
      _vec("blocks/fc2/bias", layer + "mlp.fc2.bias", (dv,)),
  ]
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    rules.append(_lin(f"blocks/attention/{ours}/kernel", f"{layer}self_attn.{theirs}.weight", dv,
                      (nh, hd)))
    rules.append(_vec(f"blocks/attention/{ours}/bias", f"{layer}self_attn.{theirs}.bias", (nh, hd)))
  return rules


def llm_rules(cfg: LLMConfig, family: str, hf_vocab: int,
              fused_experts: bool = False) -> list[Rule]:
  """Qwen2 / OLMo2 / OLMoE -> params["llm"] (the reference's scripts/convert_hf_to_molmo.py). New embedding rows are not in HF."""
  d, h = cfg.d_model, cfg.head_dim
  heads, kv = cfg.num_heads, cfg.num_kv_heads
  layer = "model.layers.{i}."
  rules = [
      Rule("embedding/pretrained", "model.embed_tokens.weight", (hf_vocab, d), (hf_vocab, d)),
      _vec("final_norm/scale", "model.norm.weight", (d,)),
      _lin("lm_head", "lm_head.weight", d, (hf_vocab,)),
      _lin("blocks/attention/query/kernel", layer + "self_attn.q_proj.weight", d, (heads, h)),
      _lin("blocks/attention/key/kernel", layer + "self_attn.k_proj.weight", d, (kv, h)),
      _lin("blocks/attention/value/kernel", layer + "self_attn.v_proj.weight", d, (kv, h)),
      _lin_out("blocks/attention/out/kernel", layer + "self_attn.o_proj.weight", (heads, h), d),
  ]
  if cfg.qkv_bias:
    rules += [_vec("blocks/attention/query/bias", layer + "self_attn.q_proj.bias", (heads, h)),
              _vec("blocks/attention/key/bias", layer + "self_attn.k_proj.bias", (kv, h)),
              _vec("blocks/attention/value/bias", layer + "self_attn.v_proj.bias", (kv, h))]
  if cfg.qk_norm:
    rules += [_vec("blocks/attention/q_norm/scale", layer + "self_attn.q_norm.weight",
                   (heads * h,)),
              _vec("blocks/attention/k_norm/scale", layer + "self_attn.k_norm.weight",
                   (kv * h,))]
  if family == "olmo2":
    # Post-norm: the norms act on the sub-layer outputs (norm_after=True in the reference's olmo/model.py).
    norms = ("post_attention_layernorm", "post_feedforward_layernorm")
  else:
    norms = ("input_layernorm", "post_attention_layernorm")
  rules += [_vec("blocks/attn_norm/scale", layer + norms[0] + ".weight", (d,)),
            _vec("blocks/ff_norm/scale", layer + norms[1] + ".weight", (d,))]
  if not cfg.is_moe:
    f = cfg.mlp_dim
    return rules + [_lin("blocks/mlp/gate/kernel", layer + "mlp.gate_proj.weight", d, (f,)),
                    _lin("blocks/mlp/up/kernel", layer + "mlp.up_proj.weight", d, (f,)),
                    _lin("blocks/mlp/down/kernel", layer + "mlp.down_proj.weight", f, (d,))]
  e, f = cfg.num_experts, cfg.expert_mlp_dim
  rules.append(_lin("blocks/moe/router", layer + "mlp.gate.weight", d, (e,)))
  if fused_experts:
    fused = layer + "mlp.experts.gate_up_proj"
    return rules + [Rule("blocks/moe/gate", fused, (e, 2 * f, d), (e, d, f), fused_expert_gate),
                    Rule("blocks/moe/up", fused, (e, 2 * f, d), (e, d, f), fused_expert_up),
                    Rule("blocks/moe/down", layer + "mlp.experts.down_proj", (e, d, f), (e, f, d),
                         expert_linear)]
  expert = layer + "mlp.experts.{e}."
  return rules + [_lin("blocks/moe/gate", expert + "gate_proj.weight", d, (f,)),
                  _lin("blocks/moe/up", expert + "up_proj.weight", d, (f,)),
                  _lin("blocks/moe/down", expert + "down_proj.weight", f, (d,))]


# --------------------------------------------------------------------------------------------
# Applying rules
# --------------------------------------------------------------------------------------------


def _expand(rule: Rule, num_layers: int, num_experts: int) -> list[list[str]] | str:
  """Source names: one name, or [layer][expert] names (a single column when there is no {e})."""
  if "{i}" not in rule.source:
    return rule.source
  experts = range(num_experts) if "{e}" in rule.source else [None]
  return [[rule.source.format(i=i, e=e) for e in experts] for i in range(num_layers)]


def _all_names(expanded: list[list[str]] | str) -> list[str]:
  return [expanded] if isinstance(expanded, str) else [n for row in expanded for n in row]


def _set_leaf(tree: Params, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _listing(names: list[str], limit: int = 20) -> str:
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def apply_rules(reader: SafetensorsDir, rules: list[Rule], num_layers: int, num_experts: int = 0,
                dtype: Any = np.float32, where: str = "checkpoint") -> tuple[Params, set[str]]:
  """Reads, checks, transforms and stacks every rule's tensors -> (nested params, names used)."""
  expanded = [_expand(r, num_layers, num_experts) for r in rules]
  used = {n for e in expanded for n in _all_names(e)}
  missing = sorted(used - set(reader.tensors))
  if missing:
    raise ValueError(f"{where}: {len(missing)} tensor(s) the config implies are missing: "
                     + _listing(missing))
  wrong = [f"{n}: {reader.tensors[n].shape}, expected {r.src_shape}"
           for r, e in zip(rules, expanded) for n in _all_names(e)
           if reader.tensors[n].shape != r.src_shape]
  if wrong:
    raise ValueError(f"{where}: shape mismatch against config.json: " + "; ".join(wrong[:20]))

  params: Params = {}
  for rule, names in zip(rules, expanded):
    convert = lambda name: rule.transform(reader.read(name).astype(dtype), rule.dst_shape)
    if isinstance(names, str):
      value = convert(names)
    elif "{e}" in rule.source:
      value = np.stack([np.stack([convert(n) for n in row]) for row in names])   # [L, E, ...]
    else:
      value = np.stack([convert(row[0]) for row in names])                      # [L, ...]
    _set_leaf(params, rule.target, np.ascontiguousarray(value))
  return params, used


def _check_leftovers(reader: SafetensorsDir, used: set[str], dropped: Callable[[str], bool],
                     where: str) -> None:
  extra = sorted(n for n in set(reader.tensors) - used if not dropped(n))
  if extra:
    raise ValueError(f"{where}: {len(extra)} unexpected tensor(s) that the config does not "
                     "explain: " + _listing(extra))


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def _clip_prefix(reader: SafetensorsDir, where: str) -> str:
  for prefix in ("vision_model.", ""):
    if prefix + "embeddings.class_embedding" in reader.tensors:
      return prefix
  raise ValueError(f"{where}: no 'embeddings.class_embedding' (with or without 'vision_model.'); "
                   "not a CLIP vision checkpoint")


def convert_clip(directory: str | Path, cfg: VisionConfig, dtype: Any = np.float32) -> Params:
  """A CLIPModel / CLIPVisionModel directory -> params["vision"] for a `cfg.num_layers` tower."""
  where = f"CLIP checkpoint {directory}"
  reader = SafetensorsDir(directory)
  prefix = _clip_prefix(reader, where)
  params, used = apply_rules(reader, clip_rules(cfg, prefix), cfg.num_layers, dtype=dtype,
                             where=where)
  later_block = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")

  def dropped(name: str) -> bool:
    if prefix and not name.startswith(prefix):
      return True                                   # CLIPModel's text tower and projections
    block = later_block.match(name)
    return ((block is not None and int(block.group(1)) >= cfg.num_layers)   # truncated tower
            or name.startswith(prefix + "post_layernorm.")
            or name.endswith("embeddings.position_ids"))                    # old buffers

  _check_leftovers(reader, used, dropped, where)
  return params


def convert_llm(directory: str | Path, cfg: LLMConfig, dtype: Any = np.float32,
                rng: np.random.Generator | None = None) -> Params:
  """A Qwen2 / OLMo2 / OLMoE directory -> params["llm"] without `embedding/new`.

  When cfg.embedding_size exceeds the HF vocabulary, the extra embedding rows are drawn from
  N(0, 0.02) (Molmo may place special tokens there, its special-token ids vocab_size + k fall in those padding rows) and the extra LM-head
  columns are zero, so those ids get a constant logit instead of a random one.
  """
  hf = read_hf_config(directory)
  family = hf.get("model_type")
  if family not in LLM_FAMILIES:
    raise ValueError(f"LLM checkpoint {directory}: model_type {family!r} is not supported; "
                     f"expected one of {list(LLM_FAMILIES)}")
  where = f"LLM checkpoint {directory} ({family})"
  hf_vocab = hf["vocab_size"]
  if hf_vocab > cfg.embedding_size:
    raise ValueError(f"{where}: vocab_size {hf_vocab} exceeds llm.embedding_size "
                     f"{cfg.embedding_size}")
  reader = SafetensorsDir(directory)
  fused = "model.layers.0.mlp.experts.gate_up_proj" in reader.tensors
  rules = llm_rules(cfg, family, hf_vocab, fused_experts=fused)
  params, used = apply_rules(reader, rules, cfg.num_layers, cfg.num_experts, dtype, where)
  _check_leftovers(reader, used, lambda n: n.endswith("rotary_emb.inv_freq"), where)

  pad = cfg.embedding_size - hf_vocab
  if pad:
    rng = rng if rng is not None else np.random.default_rng(0)
    emb = params["embedding"]["pretrained"]
    extra_rows = (0.02 * rng.standard_normal((pad, cfg.d_model))).astype(emb.dtype)
    params["embedding"]["pretrained"] = np.concatenate([emb, extra_rows])
    head = params["lm_head"]
    params["lm_head"] = np.concatenate([head, np.zeros((cfg.d_model, pad), head.dtype)], axis=1)
  return params
