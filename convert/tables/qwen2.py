"""Qwen2 (transformers' modeling_qwen2; Molmo-7B-D, 72B): pre-norm blocks, q/k/v biases, no
QK-norm."""

from __future__ import annotations

from typing import Any, Collection

from convert.engine import Rule
from convert.tables import decoder
from molmo_jax.config import LLMConfig

MODEL_TYPE = "qwen2"


def config_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  return {"qkv_bias": True}


def refused(hf: dict[str, Any]) -> list[str]:
  return []


def rules(cfg: LLMConfig, hf_vocab: int, tensors: Collection[str]) -> list[Rule]:
  return (decoder.attention_rules(cfg, hf_vocab)
          + decoder.norm_rules(cfg, "input_layernorm", "post_attention_layernorm")
          + decoder.mlp_rules(cfg))
