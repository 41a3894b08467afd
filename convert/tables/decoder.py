"""What transformers' Llama-style decoders share (modeling_qwen2, modeling_olmo2, modeling_olmoe):
the config.json keys every decoder family reads, and the tensor names of embeddings, attention,
norms, SwiGLU MLP and LM head -> params["llm"] (the reference's olmo/model.py (decoder blocks);
scripts/convert_hf_to_molmo.py).

Legend: L layers, D LLM width, H query heads, K kv heads, h head dim, F MLP width, V HF vocab rows.

A family module (qwen2.py, olmo2.py, olmoe.py) adds its LLMConfig flags and its own tensors on
top of these; `convert.tables.DECODERS` names them by config.json's `model_type`.
"""

from __future__ import annotations

from typing import Any

from convert.engine import Rule, linear_out_rule, linear_rule, vector_rule
from molmo_jax.config import LLMConfig

LAYER = "model.layers.{i}."


def rope_theta(hf: dict[str, Any], where: str) -> float:
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


def refuse_unsupported(hf: dict[str, Any], family_problems: list[str], where: str) -> None:
  """One error listing every setting no family implements, plus the family's own."""
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
  problems += family_problems
  if hf.get("clip_qkv") is not None:
    problems.append(f"clip_qkv={hf['clip_qkv']} (q/k/v clamping is not implemented)")
  if problems:
    raise ValueError(f"{where}: unsupported setting(s): " + "; ".join(problems))


def no_attention_bias(hf: dict[str, Any]) -> list[str]:
  """The OLMo families' attention has no biases here."""
  if hf.get("attention_bias", False):
    return ["attention_bias=true (OLMo-family attention has no biases here)"]
  return []


def common_config_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """LLMConfig fields read the same way in every family but the RoPE base (`rope_theta`); the
  flags are at their dense, pre-norm, bias-free values and a family replaces what it changes."""
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of "
                     f"num_key_value_heads {kv_heads}")
  return dict(
      num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=hf["intermediate_size"], norm_placement="pre",
      norm_eps=hf["rms_norm_eps"], qk_norm=False, qkv_bias=False,
      rope_max_length=hf.get("max_position_embeddings", 4096),
      vocab_size=hf["vocab_size"], embedding_size=hf["vocab_size"])


def attention_rules(cfg: LLMConfig, hf_vocab: int) -> list[Rule]:
  """Embedding, final norm, LM head, q/k/v/o (+ biases, QK-norm as the config says). New
  embedding rows are not in HF."""
  d, h, n = cfg.d_model, cfg.head_dim, cfg.num_layers
  heads, kv = cfg.num_heads, cfg.num_kv_heads
  attn = LAYER + "self_attn."
  rules = [
      Rule("embedding/pretrained", "model.embed_tokens.weight", (hf_vocab, d),
           shape=(hf_vocab, d)),
      vector_rule("final_norm/scale", "model.norm.weight", (d,)),
      linear_rule("lm_head", "lm_head.weight", d, (hf_vocab,)),
      linear_rule("blocks/attention/query/kernel", attn + "q_proj.weight", d, (heads, h), n),
      linear_rule("blocks/attention/key/kernel", attn + "k_proj.weight", d, (kv, h), n),
      linear_rule("blocks/attention/value/kernel", attn + "v_proj.weight", d, (kv, h), n),
      linear_out_rule("blocks/attention/out/kernel", attn + "o_proj.weight", (heads, h), d, n),
  ]
  if cfg.qkv_bias:
    rules += [vector_rule("blocks/attention/query/bias", attn + "q_proj.bias", (heads, h), n),
              vector_rule("blocks/attention/key/bias", attn + "k_proj.bias", (kv, h), n),
              vector_rule("blocks/attention/value/bias", attn + "v_proj.bias", (kv, h), n)]
  if cfg.qk_norm:
    rules += [vector_rule("blocks/attention/q_norm/scale", attn + "q_norm.weight", (heads * h,), n),
              vector_rule("blocks/attention/k_norm/scale", attn + "k_norm.weight", (kv * h,), n)]
  return rules


def norm_rules(cfg: LLMConfig, attention_norm: str, mlp_norm: str) -> list[Rule]:
  """Our two per-block norms from the family's names for them."""
  d, n = cfg.d_model, cfg.num_layers
  return [vector_rule("blocks/attn_norm/scale", LAYER + attention_norm + ".weight", (d,), n),
          vector_rule("blocks/ff_norm/scale", LAYER + mlp_norm + ".weight", (d,), n)]


def mlp_rules(cfg: LLMConfig) -> list[Rule]:
  """The dense SwiGLU MLP: gate_proj, up_proj, down_proj."""
  d, f, n = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  mlp = LAYER + "mlp."
  return [linear_rule("blocks/mlp/gate/kernel", mlp + "gate_proj.weight", d, (f,), n),
          linear_rule("blocks/mlp/up/kernel", mlp + "up_proj.weight", d, (f,), n),
          linear_rule("blocks/mlp/down/kernel", mlp + "down_proj.weight", f, (d,), n)]
