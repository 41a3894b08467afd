"""HF base components (CLIP, Qwen2, OLMo2, OLMoE) -> our parameter tree (the reference's olmo/image_vit.py (CLIP ViT-L/14-336); olmo/model.py (decoder blocks); scripts/convert_hf_to_molmo.py).

Legend: D LLM width, V HF vocab rows.

The tables are convert/tables/clip.py and one module per decoder family (convert.tables.DECODERS,
chosen by config.json's `model_type`); convert.engine reads, checks, transforms and stacks them,
so the result is already in the scanned layout. Every tensor of a checkpoint is accounted for:
converted, deliberately dropped (CLIP's last block and post-LN when the tower is truncated), or
outside the component (CLIPModel's text tower). Anything else is an error, as is a missing
tensor or a shape that disagrees with config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from convert.engine import Params, check_leftovers, convert_tensors
from convert.safetensors_io import SafetensorsDir
from convert.tables import clip, decoder, decoder_family
from convert.tables.clip import vision_config_from_hf
from molmo_jax.config import LLMConfig, VisionConfig

__all__ = ["read_hf_config", "vision_config_from_hf", "llm_config_from_hf", "convert_clip",
           "convert_llm"]


def read_hf_config(directory: str | Path) -> dict[str, Any]:
  path = Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model dir)")
  return json.loads(path.read_text())


def llm_config_from_hf(hf: dict[str, Any], **overrides: Any) -> LLMConfig:
  """LLMConfig of a Qwen2 / OLMo2 / OLMoE config.json; `overrides` replace fields afterwards
  (e.g. Molmo's own vocab_size, embedding_size, rope_max_length)."""
  family = decoder_family(hf.get("model_type"), "LLM config")
  where = f"LLM config ({family.MODEL_TYPE})"
  decoder.refuse_unsupported(hf, family.refused(hf), where)
  fields = decoder.common_config_fields(hf, where)
  fields.update(family.config_fields(hf, where))
  fields["rope_theta"] = decoder.rope_theta(hf, where)
  fields.update(overrides)
  return LLMConfig(**fields)


def convert_clip(directory: str | Path, cfg: VisionConfig, dtype: Any = np.float32) -> Params:
  """A CLIPModel / CLIPVisionModel directory -> params["vision"] for a `cfg.num_layers` tower."""
  where = f"CLIP checkpoint {directory}"
  reader = SafetensorsDir(directory)
  prefix = clip.tensor_prefix(reader.tensors, where)
  params, used = convert_tensors(reader, clip.rules(cfg, prefix), dtype, where)
  check_leftovers(reader, used, clip.dropped(cfg, prefix), where)
  return params


def convert_llm(directory: str | Path, cfg: LLMConfig, dtype: Any = np.float32,
                rng: np.random.Generator | None = None) -> Params:
  """A Qwen2 / OLMo2 / OLMoE directory -> params["llm"] without `embedding/new`.

  When cfg.embedding_size exceeds the HF vocabulary, the extra embedding rows are drawn from
  N(0, 0.02) (Molmo may place special tokens there, its special-token ids vocab_size + k fall in those padding rows) and the extra LM-head
  columns are zero, so those ids get a constant logit instead of a random one.
  """
  hf = read_hf_config(directory)
  family = decoder_family(hf.get("model_type"), f"LLM checkpoint {directory}")
  where = f"LLM checkpoint {directory} ({family.MODEL_TYPE})"
  hf_vocab = hf["vocab_size"]
  if hf_vocab > cfg.embedding_size:
    raise ValueError(f"{where}: vocab_size {hf_vocab} exceeds llm.embedding_size "
                     f"{cfg.embedding_size}")
  reader = SafetensorsDir(directory)
  rules = family.rules(cfg, hf_vocab, reader.tensors)
  params, used = convert_tensors(reader, rules, dtype, where)
  check_leftovers(reader, used, lambda n: n.endswith("rotary_emb.inv_freq"), where)

  pad = cfg.embedding_size - hf_vocab
  if pad:
    rng = rng if rng is not None else np.random.default_rng(0)
    emb = params["embedding"]["pretrained"]
    extra_rows = (0.02 * rng.standard_normal((pad, cfg.d_model))).astype(emb.dtype)
    params["embedding"]["pretrained"] = np.concatenate([emb, extra_rows])
    head = params["lm_head"]
    params["lm_head"] = np.concatenate([head, np.zeros((cfg.d_model, pad), head.dtype)], axis=1)
  return params
