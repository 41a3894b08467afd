"""CLIP ViT (transformers' modeling_clip: CLIPModel / CLIPVisionModel) -> params["vision"].

The reference's olmo/image_vit.py (CLIP ViT-L/14-336) and scripts/convert_hf_to_molmo.py.
Legend: Dv ViT width, Hv/hv ViT heads/head dim, Fv ViT MLP width, p patch side, S positions.

Molmo drops CLIP's last block and its post-LN (23 of 24 blocks kept); both, CLIPModel's text
tower and old `position_ids` buffers are the tensors this table deliberately leaves out.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Collection

from convert.engine import (PATCH_CONV, Rule, linear_out_rule, linear_rule, vector_rule)
from molmo_jax.config import VisionConfig

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}


def vision_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
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
  v = vision_hf_config(hf)
  act = v.get("hidden_act", "quick_gelu")
  if act not in _ACTIVATIONS:
    raise ValueError(f"CLIP config: hidden_act {act!r} unsupported; expected one of "
                     f"{sorted(_ACTIVATIONS)}")
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
                     mlp_dim=v["intermediate_size"], activation=_ACTIVATIONS[act],
                     layer_norm_eps=v.get("layer_norm_eps", 1e-5), use_cls_token=True,
                     use_pre_ln=True, patch_bias=False)
  if selected_layers is not None:
    cfg = dataclasses.replace(cfg, selected_layers=tuple(selected_layers))
  cfg.resolved_layers()   # a clear error now rather than at the first forward pass
  return cfg


def tensor_prefix(tensors: Collection[str], where: str) -> str:
  """"vision_model." in a CLIPModel / CLIPVisionModel, "" in a bare vision state dict."""
  for prefix in ("vision_model.", ""):
    if prefix + "embeddings.class_embedding" in tensors:
      return prefix
  raise ValueError(f"{where}: no 'embeddings.class_embedding' (with or without 'vision_model.'); "
                   "not a CLIP vision checkpoint")


def rules(cfg: VisionConfig, prefix: str) -> list[Rule]:
  """The CLIP vision tower -> params["vision"] (the reference's scripts/convert_hf_to_molmo.py)."""
  dv, nh, hd, p, n = cfg.width, cfg.num_heads, cfg.head_dim, cfg.patch_size, cfg.num_layers
  layer = prefix + "encoder.layers.{i}."
  table = [
      Rule("patch_embed/kernel", prefix + "embeddings.patch_embedding.weight", (dv, 3, p, p),
           PATCH_CONV, shape=(cfg.patch_dim, dv)),
      vector_rule("class_embedding", prefix + "embeddings.class_embedding", (dv,)),
      Rule("positional_embedding", prefix + "embeddings.position_embedding.weight",
           (cfg.num_positions, dv), shape=(cfg.num_positions, dv)),
      vector_rule("pre_ln/scale", prefix + "pre_layrnorm.weight", (dv,)),
      vector_rule("pre_ln/bias", prefix + "pre_layrnorm.bias", (dv,)),
      vector_rule("blocks/attention_norm/scale", layer + "layer_norm1.weight", (dv,), n),
      vector_rule("blocks/attention_norm/bias", layer + "layer_norm1.bias", (dv,), n),
      vector_rule("blocks/ffn_norm/scale", layer + "layer_norm2.weight", (dv,), n),
      vector_rule("blocks/ffn_norm/bias", layer + "layer_norm2.bias", (dv,), n),
      linear_out_rule("blocks/attention/out/kernel", layer + "self_attn.out_proj.weight", (nh, hd),
                      dv, n),
      vector_rule("blocks/attention/out/bias", layer + "self_attn.out_proj.bias", (dv,), n),
      linear_rule("blocks/fc1/kernel", layer + "mlp.fc1.weight", dv, (cfg.mlp_dim,), n),
      vector_rule("blocks/fc1/bias", layer + "mlp.fc1.bias", (cfg.mlp_dim,), n),
      linear_rule("blocks/fc2/kernel", layer + "mlp.fc2.weight", cfg.mlp_dim, (dv,), n),
      vector_rule("blocks/fc2/bias", layer + "mlp.fc2.bias", (dv,), n),
  ]
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    table.append(linear_rule(f"blocks/attention/{ours}/kernel", f"{layer}self_attn.{theirs}.weight",
                             dv, (nh, hd), n))
    table.append(vector_rule(f"blocks/attention/{ours}/bias", f"{layer}self_attn.{theirs}.bias",
                             (nh, hd), n))
  return table


def dropped(cfg: VisionConfig, prefix: str) -> Callable[[str], bool]:
  """Whether a tensor the table does not read is deliberately left out."""
  later_block = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")

  def is_dropped(name: str) -> bool:
    if prefix and not name.startswith(prefix):
      return True                                   # CLIPModel's text tower and projections
    block = later_block.match(name)
    return ((block is not None and int(block.group(1)) >= cfg.num_layers)   # truncated tower
            or name.startswith(prefix + "post_layernorm.")
            or name.endswith("embeddings.position_ids"))                    # old buffers

  return is_dropped
