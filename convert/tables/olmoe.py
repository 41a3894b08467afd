"""OLMoE (transformers' modeling_olmoe; MolmoE-1B): pre-norm blocks, full-width QK-norm, a
top-k router over SwiGLU experts.

Legend: L layers, E experts, D width, F expert MLP width.

Experts are stored per expert (`mlp.experts.{e}.gate_proj.weight`, ...) or, as transformers
>= 5 holds them in memory, fused per layer: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows
first) and `mlp.experts.down_proj` [E, D, F]. Both become [L, E, D, F] / [L, E, F, D].
"""

from __future__ import annotations

from typing import Any, Collection

from convert.engine import EXPERTS_LINEAR, Rule, linear_rule, split_rules
from convert.tables import decoder
from molmo_jax.config import LLMConfig

MODEL_TYPE = "olmoe"


def config_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // heads
  if head_dim * heads != d:
    raise ValueError(f"{where}: head_dim {head_dim} x heads {heads} != hidden_size {d}; OLMoE's "
                     "q_norm is hidden_size wide")
  return dict(qk_norm=True, num_experts=hf["num_experts"],
              experts_per_token=hf["num_experts_per_tok"], expert_mlp_dim=hf["intermediate_size"],
              moe_normalize_topk=bool(hf.get("norm_topk_prob", False)))


refused = decoder.no_attention_bias


def rules(cfg: LLMConfig, hf_vocab: int, tensors: Collection[str]) -> list[Rule]:
  d, e, f, n = cfg.d_model, cfg.num_experts, cfg.expert_mlp_dim, cfg.num_layers
  mlp = decoder.LAYER + "mlp."
  table = (decoder.attention_rules(cfg, hf_vocab)
           + decoder.norm_rules(cfg, "input_layernorm", "post_attention_layernorm")
           + [linear_rule("blocks/moe/router", mlp + "gate.weight", d, (e,), n)])
  if "model.layers.0.mlp.experts.gate_up_proj" in tensors:
    return table + split_rules(
        [("blocks/moe/gate", f), ("blocks/moe/up", f)], mlp + "experts.gate_up_proj", (d,),
        EXPERTS_LINEAR, n, lead=(e,), shape=lambda size: (e, d, size)) + [
        Rule("blocks/moe/down", mlp + "experts.down_proj", (e, d, f), EXPERTS_LINEAR, n,
             shape=(e, f, d))]
  expert = mlp + "experts.{e}."
  return table + [linear_rule("blocks/moe/gate", expert + "gate_proj.weight", d, (f,), n, e),
                  linear_rule("blocks/moe/up", expert + "up_proj.weight", d, (f,), n, e),
                  linear_rule("blocks/moe/down", expert + "down_proj.weight", f, (d,), n, e)]
