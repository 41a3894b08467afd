"""OLMo2 (transformers' modeling_olmo2; Molmo-7B-O): post-norm blocks, full-width QK-norm, no
attention biases."""

from __future__ import annotations

from typing import Any, Collection

from convert.engine import Rule
from convert.tables import decoder
from molmo_jax.config import LLMConfig

MODEL_TYPE = "olmo2"


def config_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
  return {"norm_placement": "post", "qk_norm": True}


refused = decoder.no_attention_bias


def rules(cfg: LLMConfig, hf_vocab: int, tensors: Collection[str]) -> list[Rule]:
  # Post-norm: the norms act on the sub-layer outputs (norm_after=True in the reference's olmo/model.py).
  return (decoder.attention_rules(cfg, hf_vocab)
          + decoder.norm_rules(cfg, "post_attention_layernorm", "post_feedforward_layernorm")
          + decoder.mlp_rules(cfg))
