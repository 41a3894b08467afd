"""The released Molmo checkpoints (the reference's olmo/hf_molmo.py): tensor names, shapes and
fused layouts of every part (both directions: import and export), and the config.json keys of
the two release schemas (the released config.json files).

Legend: L LLM layers, Lv ViT layers, D LLM width, H/K query/kv heads, h head dim, F MLP width per
SwiGLU branch, E experts, Fe expert width, V_emb pretrained embedding rows, A additional rows,
Dv ViT width, Hv/hv ViT heads/head dim, Fv ViT MLP width, C patch values (p*p*3), S ViT positions,
Dc connector input width (Dv x selected layers), Hp/hp pooling heads/head dim, Fp projector width.

Rules (convert.engine) name whole-model paths ("llm/blocks/..."); our leaf shapes come from the
model's parameter tree (`check_rules_match`). Fused tensors, each leaf owning a row block:

  att_proj [Q (H*h) | K (K*h) | V (K*h), D]   -> query / key / value        (bias the same way)
  ff_proj  [up (F) | gate (F), D]             -> mlp/up, mlp/gate           (UP FIRST)

Megablocks experts: w1 / v1 [E*Fe, D] -> gate / up [E, D, Fe] (experts_linear); w2 is stored
as [Fe, D] per expert, which is already our down [E, Fe, D] (copy).

Both families (dense `molmo` schema: 7B-D, 72B, 7B-O; flat OLMo-style `molmoe` schema: MolmoE-1B)
share the vision tower and connector names.
"""

from __future__ import annotations

from convert.engine import COPY, EXPERTS_LINEAR, LINEAR, Rule, split_rules
from molmo_jax.config import MolmoConfig


def vision_rules(cfg: MolmoConfig) -> list[Rule]:
  v = cfg.vision
  lv, dv, hq, fv = v.num_layers, v.width, v.num_heads * v.head_dim, v.mlp_dim
  p = "model.vision_backbone.image_vit."
  b = p + "transformer.resblocks.{i}."
  rules = [Rule("vision/patch_embed/kernel", p + "patch_embedding.weight", (dv, v.patch_dim), LINEAR),
           Rule("vision/positional_embedding", p + "positional_embedding", (v.num_positions, dv))]
  if v.patch_bias:
    rules.append(Rule("vision/patch_embed/bias", p + "patch_embedding.bias", (dv,)))
  if v.use_cls_token:
    rules.append(Rule("vision/class_embedding", p + "class_embedding", (dv,)))
  if v.use_pre_ln:
    rules += [Rule("vision/pre_ln/scale", p + "pre_ln.weight", (dv,)),
              Rule("vision/pre_ln/bias", p + "pre_ln.bias", (dv,))]
  for ours, hf in (("attention_norm", "attention_norm"), ("ffn_norm", "ffn_norm")):
    rules += [Rule(f"vision/blocks/{ours}/scale", b + f"{hf}.weight", (dv,), COPY, lv),
              Rule(f"vision/blocks/{ours}/bias", b + f"{hf}.bias", (dv,), COPY, lv)]
  for ours, hf in (("query", "wq"), ("key", "wk"), ("value", "wv")):
    rules += [Rule(f"vision/blocks/attention/{ours}/kernel", b + f"attention.{hf}.weight", (hq, dv),
                   LINEAR, lv),
              Rule(f"vision/blocks/attention/{ours}/bias", b + f"attention.{hf}.bias", (hq,), COPY, lv)]
  rules += [
      Rule("vision/blocks/attention/out/kernel", b + "attention.wo.weight", (dv, hq), LINEAR, lv),
      Rule("vision/blocks/attention/out/bias", b + "attention.wo.bias", (dv,), COPY, lv),
      Rule("vision/blocks/fc1/kernel", b + "feed_forward.w1.weight", (fv, dv), LINEAR, lv),
      Rule("vision/blocks/fc1/bias", b + "feed_forward.w1.bias", (fv,), COPY, lv),
      Rule("vision/blocks/fc2/kernel", b + "feed_forward.w2.weight", (dv, fv), LINEAR, lv),
      Rule("vision/blocks/fc2/bias", b + "feed_forward.w2.bias", (dv,), COPY, lv),
  ]
  return rules


def connector_rules(cfg: MolmoConfig) -> list[Rule]:
  v, c = cfg.vision, cfg.connector
  dc = v.width * len(v.selected_layers)
  p = "model.vision_backbone."
  rules = []
  if c.padding_embed == "pad_and_partial_pad":
    rules.append(Rule("connector/pad_embed", p + "pad_embed", (2, dc)))
  projector_in = dc
  if c.pooling == "attention_meanq":
    hp = c.pool_heads * c.pool_head_dim
    for ours, hf in (("query", "wq"), ("key", "wk"), ("value", "wv")):
      rules += [Rule(f"connector/pooling/{ours}/kernel", p + f"image_pooling_2d.{hf}.weight", (hp, dc),
                     LINEAR),
                Rule(f"connector/pooling/{ours}/bias", p + f"image_pooling_2d.{hf}.bias", (hp,))]
    rules += [Rule("connector/pooling/out/kernel", p + "image_pooling_2d.wo.weight", (v.width, hp), LINEAR),
              Rule("connector/pooling/out/bias", p + "image_pooling_2d.wo.bias", (v.width,))]
    projector_in = v.width
  fp = c.projector_hidden
  rules += [
      Rule("connector/projector/gate/kernel", p + "image_projector.w1.weight", (fp, projector_in), LINEAR),
      Rule("connector/projector/up/kernel", p + "image_projector.w3.weight", (fp, projector_in), LINEAR),
      Rule("connector/projector/down/kernel", p + "image_projector.w2.weight", (cfg.llm.d_model, fp),
           LINEAR),
  ]
  return rules


def llm_rules(cfg: MolmoConfig) -> list[Rule]:
  m = cfg.llm
  n, d, q, kv = m.num_layers, m.d_model, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  p = "model.transformer."
  b = p + "blocks.{i}."
  rules = [
      Rule("llm/embedding/pretrained", p + "wte.embedding", (m.embedding_size, d)),
      Rule("llm/embedding/new", p + "wte.new_embedding", (m.additional_vocab_size, d)),
      Rule("llm/final_norm/scale", p + "ln_f.weight", (d,)),
      Rule("llm/lm_head", p + "ff_out.weight", (m.embedding_size, d), LINEAR),
      Rule("llm/blocks/attn_norm/scale", b + "attn_norm.weight", (d,), COPY, n),
      Rule("llm/blocks/ff_norm/scale", b + "ff_norm.weight", (d,), COPY, n),
      Rule("llm/blocks/attention/out/kernel", b + "attn_out.weight", (d, q), LINEAR, n),
  ]
  qkv = [("llm/blocks/attention/query/{}", q), ("llm/blocks/attention/key/{}", kv),
         ("llm/blocks/attention/value/{}", kv)]
  rules += split_rules([(o.format("kernel"), s) for o, s in qkv], b + "att_proj.weight", (d,), LINEAR, n)
  if m.qkv_bias:
    rules += split_rules([(o.format("bias"), s) for o, s in qkv], b + "att_proj.bias", (), COPY, n)
  if m.qk_norm:
    rules += [Rule("llm/blocks/attention/q_norm/scale", b + "q_norm.weight", (q,), COPY, n),
              Rule("llm/blocks/attention/k_norm/scale", b + "k_norm.weight", (kv,), COPY, n)]
  if m.is_moe:
    e, fe = m.num_experts, m.expert_mlp_dim
    x = b + "ffn.experts.mlp."
    rules += [Rule("llm/blocks/moe/router", b + "ffn.router.layer.weight", (e, d), LINEAR, n),
              Rule("llm/blocks/moe/gate", x + "w1", (e * fe, d), EXPERTS_LINEAR, n),
              Rule("llm/blocks/moe/up", x + "v1", (e * fe, d), EXPERTS_LINEAR, n),
              Rule("llm/blocks/moe/down", x + "w2", (e * fe, d), COPY, n)]
  else:
    f = m.mlp_dim
    rules += split_rules([("llm/blocks/mlp/up/kernel", f), ("llm/blocks/mlp/gate/kernel", f)],
                    b + "ff_proj.weight", (d,), LINEAR, n)
    rules.append(Rule("llm/blocks/mlp/down/kernel", b + "ff_out.weight", (d, f), LINEAR, n))
  return rules


def rules_for(cfg: MolmoConfig) -> list[Rule]:
  return vision_rules(cfg) + connector_rules(cfg) + llm_rules(cfg)


# ------------------------------------------------------------------------------------------
# config.json keys (the released config.json). The remote code hard-codes the vision tower and connector; our
# VisionConfig / ConnectorConfig / PreprocessConfig defaults are exactly those release values.
# ------------------------------------------------------------------------------------------

MODEL_TYPE = "molmo"
DENSE_ARCHITECTURE = "MolmoForCausalLM"
FLAT_ARCHITECTURE = "OLMoForCausalLM"

DENSE_FIXED = {   # keys every dense release config.json carries, with the release values
    "architectures": [DENSE_ARCHITECTURE],
    "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                 "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
    "clip_qkv": None, "initializer_range": 0.02, "layer_norm_type": "rms", "model_type": MODEL_TYPE,
    "tie_word_embeddings": False, "use_cache": True, "use_position_ids": True, "weight_tying": False,
}
DENSE_MAPPED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "qkv_bias", "attention_layer_norm", "norm_after",
                "layer_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
                "embedding_size")

# Native-style keys either schema may carry (MolmoE's flat config always does). In a dense
# config they override the hard-coded release values, so small test checkpoints load too.
NATIVE_MAPPED = ("vision_backbone", "vit_layers", "image_pooling_2d", "image_pooling_h",
                 "image_pooling_w", "image_padding_embed", "max_crops", "overlap_margins",
                 "use_col_tokens", "always_start_with_space", "additional_vocab_size", "head_dim",
                 "fix_image_padding", "pad_value", "max_sequence_length", "block_type",
                 "residual_dropout", "response_residual_dropout")

FLAT_MAPPED = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size",
               "block_type", "qkv_bias", "attention_layer_norm", "norm_after", "layer_norm_eps",
               "rope_theta", "max_position_embeddings", "max_sequence_length", "vocab_size",
               "embedding_size", "moe_num_experts", "moe_top_k", "moe_dropless",
               "moe_capacity_factor", "moe_loss_weight", "moe_zloss_weight", "residual_dropout",
               "response_residual_dropout")

# The same LLM setting under its dense (HF) and its flat (native) name. Either schema may carry the
# other schema's name too; it is accepted when it agrees with the value the schema's own key gives.
LLM_ALIASES = (("hidden_size", "d_model"), ("num_hidden_layers", "n_layers"),
               ("num_attention_heads", "n_heads"), ("num_key_value_heads", "n_kv_heads"),
               ("intermediate_size", "mlp_hidden_size"))
# Native MoE settings: they change nothing in a network of sequential (dense) blocks, where the
# native code does not read them, so a dense config may carry them with any value.
MOE_KEYS = ("moe_num_experts", "moe_top_k", "moe_dropless", "moe_capacity_factor",
            "moe_loss_weight", "moe_zloss_weight")

# Keys whose value must be one of these (anything else changes the network in a way we do not
# implement). Checked wherever the key appears.
MUST_EQUAL: dict[str, tuple] = {
    "model_type": (MODEL_TYPE,), "activation_type": ("swiglu",), "alibi": (False,),
    "attention_layer_norm_with_affine": (True,), "attn_logit_softcapping": (None,),
    "bias_for_layer_norm": (False, None), "clip_qkv": (None,), "crop_mode": ("overlap-and-resize-c2",),
    "final_logit_softcapping": (None,), "image_projector": ("mlp",), "include_bias": (False,),
    "layer_norm_type": ("rms",), "layer_norm_with_affine": (True,), "moe_interleave": (False,),
    "moe_shared_expert": (False,), "multi_query_attention": (None, False),
    "normalize_input_embeds": (False,), "pad_to": (None,), "remove_black_pads": (False,),
    "rope": (True,), "rope_impl": ("llama",),
    "scale_logits": (False,), "unconditioned": (False,), "use_cls_feature": (False,),
    "use_position_ids": (True,), "weight_tying": (False,), "tie_word_embeddings": (False,),
}

# Training, prompting and bookkeeping knobs: read and ignored (they do not change the weights or
# the forward pass at inference).
IGNORED = frozenset({
    "_name_or_path", "alibi_bias_max", "architectures", "attention_dropout", "attention_type",
    "auto_map", "block_group_size", "default_inference_len", "do_random_scale", "dtype",
    "embedding_dropout", "fix_image_input_idx", "float32_attention", "gin_bindings",
    "image_feature_dropout", "init_cutoff_factor", "init_device", "init_fn", "init_std",
    "initializer_range", "llm_load_path", "loss_token_weighting", "low_cpu_fsdp",
    "message_formatting", "moe_lbl_in_fp32", "moe_log_expert_assignment", "moe_mlp_impl",
    "multi_annotation_weighting", "tokenizer",
    "new_embedding_init_range", "pad_token_id", "pad_tokenizer", "precision", "prompt_override",
    "prompt_type", "query_pre_attn_scalar", "response_attention_dropout", "rope_full_precision",
    "system_prompt_kind", "torch_dtype", "transformers_version", "use_cache", "vit_load_path",
})

# The MolmoE-1B release's flat config.json (the released config.json): the values export writes for every key
# our config does not determine.
FLAT_RELEASE = {
    "activation_type": "swiglu", "additional_vocab_size": 128, "alibi": False,
    "alibi_bias_max": 8.0, "always_start_with_space": True, "architectures": [FLAT_ARCHITECTURE],
    "attention_dropout": 0.0, "attention_layer_norm": True, "attention_layer_norm_with_affine": True,
    "attention_type": "sdpa", "attn_logit_softcapping": None,
    "auto_map": {"AutoConfig": "config_molmoe.MolmoConfig",
                 "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "moe", "clip_qkv": None,
    "crop_mode": "overlap-and-resize-c2", "d_model": 2048, "default_inference_len": 65,
    "do_random_scale": False, "embedding_dropout": 0.0, "embedding_size": 50304,
    "final_logit_softcapping": None, "fix_image_input_idx": 2, "float32_attention": True,
    "gin_bindings": None, "head_dim": None, "image_feature_dropout": 0.0,
    "image_padding_embed": "pad_and_partial_pad", "image_pooling_2d": "attention-meanq",
    "image_pooling_h": 2, "image_pooling_w": 2, "image_projector": "mlp", "include_bias": False,
    "init_cutoff_factor": 3.0, "init_device": "meta", "init_fn": "normal", "init_std": 0.02,
    "initializer_range": 0.02, "layer_norm_eps": 1e-05, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "llm_load_path": None, "loss_token_weighting": "root_subsegments",
    "low_cpu_fsdp": True, "max_crops": 12, "max_position_embeddings": 32768,
    "max_sequence_length": 4096, "message_formatting": "role", "mlp_hidden_size": None,
    "mlp_ratio": 1, "model_type": MODEL_TYPE, "moe_capacity_factor": 1.25, "moe_dropless": True,
    "moe_interleave": False, "moe_lbl_in_fp32": False, "moe_log_expert_assignment": False,
    "moe_loss_weight": 0.0, "moe_mlp_impl": "sparse", "moe_num_experts": 64,
    "moe_shared_expert": False, "moe_top_k": 8, "moe_zloss_weight": 0.0,
    "multi_query_attention": None, "n_heads": 16, "n_kv_heads": None, "n_layers": 16,
    "new_embedding_init_range": 0.02, "norm_after": False, "normalize_input_embeds": False,
    "overlap_margins": [4, 4], "pad_to": None, "pad_token_id": 1, "pad_tokenizer": False,
    "precision": "amp_bf16", "prompt_override": None, "prompt_type": "uber_model", "qkv_bias": False,
    "query_pre_attn_scalar": 224, "residual_dropout": 0.1, "response_attention_dropout": 0.0,
    "response_residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
    "rope_impl": "llama", "rope_theta": 10000.0, "scale_logits": False,
    "system_prompt_kind": "demo_or_style", "unconditioned": False, "use_cache": True,
    "use_cls_feature": False, "use_col_tokens": True, "use_position_ids": True,
    "vision_backbone": None, "vit_layers": [-2, -9], "vit_load_path": None, "vocab_size": 50280,
    "weight_tying": False,
}

# `vision_backbone` block (native VisionBackboneConfig): mapped keys, and the release values of
# the rest. Missing mapped keys default to the release tower.
VISION_MAPPED = ("image_default_input_size", "image_patch_size", "image_pos_patch_size",
                 "image_emb_dim", "image_num_heads", "image_num_key_value_heads", "image_num_layers",
                 "image_head_dim", "image_mlp_dim", "image_mlp_activations", "image_num_pos",
                 "image_norm_eps", "image_model_type", "resize_mode")
VISION_RELEASE_EXTRA = {"attention_dropout": 0.0, "fsdp_wrap": False, "image_dropout_rate": 0.0,
                        "initializer_range": 0.02, "residual_dropout": 0.0}

# preprocessor_config.json of the releases (the HF image processor's settings).
PREPROCESSOR_MAPPED = ("base_image_input_size", "image_patch_size", "max_crops", "overlap_margins",
                       "image_mean", "image_std", "image_token_length_h", "image_token_length_w",
                       "do_normalize", "image_padding_mask")
PREPROCESSOR_IGNORED = frozenset({"auto_map", "image_processor_type", "processor_class"})
PREPROCESSOR_RELEASE_EXTRA = {
    "auto_map": {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
                 "AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
    "image_processor_type": "MolmoImageProcessor", "processor_class": "MolmoProcessor",
}
