"""One table module per checkpoint family, and the registry of decoder families.

  clip.py           CLIP ViT (CLIPModel / CLIPVisionModel)        -> params["vision"]
  qwen2.py          Qwen2                                          -> params["llm"]
  olmo2.py          OLMo2                                          -> params["llm"]
  olmoe.py          OLMoE                                          -> params["llm"]
  molmo_release.py  the released Molmo checkpoints (every part, both directions, and the
                    config.json keys of the release schemas)
  decoder.py        what the transformers decoder families share

A decoder family module defines `MODEL_TYPE` (config.json's `model_type`), `config_fields(hf,
where)` (the LLMConfig flags it sets and any fields only it reads), `refused(hf)` (settings of
its config.json we do not implement, as messages) and `rules(cfg, hf_vocab, tensors)` (its
table). Adding a family is one such file plus its line in DECODERS (docs/conversion.md).
"""

from __future__ import annotations

from types import ModuleType

from convert.tables import olmo2, olmoe, qwen2

DECODERS: dict[str, ModuleType] = {family.MODEL_TYPE: family for family in (qwen2, olmo2, olmoe)}


def decoder_family(model_type: str | None, where: str) -> ModuleType:
  """The table module of a decoder config.json's `model_type`."""
  if model_type not in DECODERS:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                     f"{list(DECODERS)}")
  return DECODERS[model_type]
