"""Release HF checkpoint <-> Orbax model directory (the released config.json-the released fused tensor layouts (olmo/hf_molmo.py)), on tiny models of each family.

Legend: L layers, D LLM width, E experts, Fe expert width, Dv ViT width.

The HF side of every test is built by `write_release_dir`, a writer that lays our tiny random
parameters out per the released safetensors names (olmo/hf_molmo.py) / the released fused tensor layouts (olmo/hf_molmo.py) on its own (it shares no code with the converters) and saves
them with the `safetensors` package; config.json follows the the released config.json schemas. The converters must
turn it into a model directory whose logits equal those of the model built directly from the same
weights, and export it back bit for bit.
"""

import dataclasses
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import inspect as inspect_cli
from convert import release_config
from convert.hf_to_orbax import convert_hf_to_orbax
from convert.orbax_to_hf import convert_orbax_to_hf
from molmo_jax import config as C
from molmo_jax.models.molmo import Molmo
from molmo_jax.model_dir import load_model_checkpoint, save_model_checkpoint

FAMILIES = ("qwen2", "olmo", "olmoe")
T, CROPS = 40, 2
SIDE_FILES = {"tokenizer.json": '{"version": "1.0"}', "added_tokens.json": '{"<im_start>": 90}',
              "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}'}


# ----------------------------------------------------------------------------------------------
# An independent writer of the release layout (the released safetensors names (olmo/hf_molmo.py) names/shapes, the released fused tensor layouts (olmo/hf_molmo.py) fused layouts)
# ----------------------------------------------------------------------------------------------

def release_tensors(params, cfg) -> dict[str, np.ndarray]:
  t = lambda x: np.ascontiguousarray(np.asarray(x).T)
  out = {}
  vis, con, llm = params["vision"], params["connector"], params["llm"]
  p = "model.vision_backbone.image_vit."
  out[p + "patch_embedding.weight"] = t(vis["patch_embed"]["kernel"])
  out[p + "class_embedding"] = np.asarray(vis["class_embedding"])
  out[p + "positional_embedding"] = np.asarray(vis["positional_embedding"])
  out[p + "pre_ln.weight"] = np.asarray(vis["pre_ln"]["scale"])
  out[p + "pre_ln.bias"] = np.asarray(vis["pre_ln"]["bias"])
  dv = cfg.vision.width
  for j in range(cfg.vision.num_layers):
    blk = jax.tree.map(lambda x: np.asarray(x[j]), vis["blocks"])
    b = f"{p}transformer.resblocks.{j}."
    for ours, hf in (("query", "wq"), ("key", "wk"), ("value", "wv")):
      out[b + f"attention.{hf}.weight"] = t(blk["attention"][ours]["kernel"].reshape(dv, -1))
      out[b + f"attention.{hf}.bias"] = blk["attention"][ours]["bias"].reshape(-1)
    out[b + "attention.wo.weight"] = t(blk["attention"]["out"]["kernel"].reshape(-1, dv))
    out[b + "attention.wo.bias"] = blk["attention"]["out"]["bias"]
    for norm in ("attention_norm", "ffn_norm"):
      out[b + f"{norm}.weight"] = blk[norm]["scale"]
      out[b + f"{norm}.bias"] = blk[norm]["bias"]
    out[b + "feed_forward.w1.weight"] = t(blk["fc1"]["kernel"])
    out[b + "feed_forward.w1.bias"] = blk["fc1"]["bias"]
    out[b + "feed_forward.w2.weight"] = t(blk["fc2"]["kernel"])
    out[b + "feed_forward.w2.bias"] = blk["fc2"]["bias"]
  c = "model.vision_backbone."
  out[c + "pad_embed"] = np.asarray(con["pad_embed"])
  dc = con["pad_embed"].shape[1]
  for ours, hf in (("query", "wq"), ("key", "wk"), ("value", "wv")):
    out[c + f"image_pooling_2d.{hf}.weight"] = t(np.asarray(con["pooling"][ours]["kernel"]).reshape(dc, -1))
    out[c + f"image_pooling_2d.{hf}.bias"] = np.asarray(con["pooling"][ours]["bias"]).reshape(-1)
  out[c + "image_pooling_2d.wo.weight"] = t(np.asarray(con["pooling"]["out"]["kernel"]).reshape(-1, dv))
  out[c + "image_pooling_2d.wo.bias"] = np.asarray(con["pooling"]["out"]["bias"])
  out[c + "image_projector.w1.weight"] = t(con["projector"]["gate"]["kernel"])     # w1 = gate
  out[c + "image_projector.w3.weight"] = t(con["projector"]["up"]["kernel"])       # w3 = up
  out[c + "image_projector.w2.weight"] = t(con["projector"]["down"]["kernel"])
  m = cfg.llm
  d = m.d_model
  out["model.transformer.wte.embedding"] = np.asarray(llm["embedding"]["pretrained"])
  out["model.transformer.wte.new_embedding"] = np.asarray(llm["embedding"]["new"])
  out["model.transformer.ln_f.weight"] = np.asarray(llm["final_norm"]["scale"])
  out["model.transformer.ff_out.weight"] = t(llm["lm_head"])
  for i in range(m.num_layers):
    blk = jax.tree.map(lambda x: np.asarray(x[i]), llm["blocks"])
    b = f"model.transformer.blocks.{i}."
    att = blk["attention"]
    out[b + "att_proj.weight"] = np.concatenate(
        [att[k]["kernel"].reshape(d, -1).T for k in ("query", "key", "value")], axis=0)
    if m.qkv_bias:
      out[b + "att_proj.bias"] = np.concatenate([att[k]["bias"].reshape(-1) for k in ("query", "key", "value")])
    if m.qk_norm:
      out[b + "q_norm.weight"] = att["q_norm"]["scale"]
      out[b + "k_norm.weight"] = att["k_norm"]["scale"]
    out[b + "attn_out.weight"] = t(att["out"]["kernel"].reshape(-1, d))
    out[b + "attn_norm.weight"] = blk["attn_norm"]["scale"]
    out[b + "ff_norm.weight"] = blk["ff_norm"]["scale"]
    if m.is_moe:
      moe = blk["moe"]
      out[b + "ffn.router.layer.weight"] = t(moe["router"])
      out[b + "ffn.experts.mlp.w1"] = np.concatenate([g.T for g in moe["gate"]], axis=0)
      out[b + "ffn.experts.mlp.v1"] = np.concatenate([u.T for u in moe["up"]], axis=0)
      out[b + "ffn.experts.mlp.w2"] = np.concatenate(list(moe["down"]), axis=0)   # [Fe, D] each
    else:
      mlp = blk["mlp"]
      out[b + "ff_proj.weight"] = np.concatenate([mlp["up"]["kernel"].T, mlp["gate"]["kernel"].T])
      out[b + "ff_out.weight"] = t(mlp["down"]["kernel"])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


VISION_BLOCK_EXTRA = {"attention_dropout": 0.0, "fsdp_wrap": False, "image_dropout_rate": 0.0,
                      "initializer_range": 0.02, "residual_dropout": 0.0}


def vision_block(v):
  return {**VISION_BLOCK_EXTRA, "image_default_input_size": [v.image_size] * 2,
          "image_emb_dim": v.width, "image_head_dim": v.head_dim, "image_mlp_activations": v.activation,
          "image_mlp_dim": v.mlp_dim, "image_model_type": "openai", "image_norm_eps": v.layer_norm_eps,
          "image_num_heads": v.num_heads, "image_num_key_value_heads": v.num_heads,
          "image_num_layers": v.num_layers, "image_num_pos": v.num_positions,
          "image_patch_size": v.patch_size, "image_pos_patch_size": v.patch_size, "resize_mode": "default"}


def dense_config_json(cfg, torch_dtype="float32"):
  m = cfg.llm
  return {
      "architectures": ["MolmoForCausalLM"], "model_type": "molmo",
      "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                   "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
      "attention_layer_norm": m.qk_norm, "clip_qkv": None, "embedding_size": m.embedding_size,
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": 2 * m.mlp_dim,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "layer_norm_type": "rms", "layer_norm_eps": m.norm_eps,
      "max_position_embeddings": m.rope_max_length, "rope_theta": m.rope_theta,
      "norm_after": m.norm_placement == "post", "qkv_bias": m.qkv_bias, "initializer_range": 0.02,
      "tie_word_embeddings": False, "weight_tying": False, "use_cache": True, "use_position_ids": True,
      "torch_dtype": torch_dtype,
      # Native-style overrides of the hard-coded release tower (the tiny model differs from it).
      "vision_backbone": vision_block(cfg.vision), "vit_layers": list(cfg.vision.selected_layers),
      "additional_vocab_size": m.additional_vocab_size}


def flat_config_json(cfg, torch_dtype="float32"):
  m = cfg.llm
  out = {k: v for k, v in MOLMOE_RELEASE_CONFIG.items() if k != "transformers_version"}
  out.update({
      "d_model": m.d_model, "n_heads": m.num_heads, "n_kv_heads": None, "n_layers": m.num_layers, "mlp_ratio": 2 * m.expert_mlp_dim // m.d_model,
      "mlp_hidden_size": None, "moe_num_experts": m.num_experts, "moe_top_k": m.experts_per_token,
      "vocab_size": m.vocab_size, "embedding_size": m.embedding_size,
      "additional_vocab_size": m.additional_vocab_size, "layer_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta, "max_position_embeddings": m.rope_max_length,
      "residual_dropout": 0.0, "vision_backbone": vision_block(cfg.vision),
      "vit_layers": list(cfg.vision.selected_layers), "max_crops": cfg.preprocess.max_crops,
      "overlap_margins": list(cfg.preprocess.overlap_margins), "torch_dtype": torch_dtype})
  return out


def preprocessor_json(cfg):
  p = cfg.preprocess
  tokens = p.crop_patches // p.pool_size
  return {"auto_map": {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
                       "AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
          "base_image_input_size": [p.crop_size, p.crop_size], "do_normalize": True,
          "image_mean": list(p.image_mean), "image_padding_mask": True,
          "image_patch_size": p.patch_size, "image_processor_type": "MolmoImageProcessor",
          "image_std": list(p.image_std), "image_token_length_h": tokens,
          "image_token_length_w": tokens, "max_crops": p.max_crops,
          "overlap_margins": list(p.overlap_margins), "processor_class": "MolmoProcessor"}


def write_release_dir(directory: Path, params, cfg, dtype=np.float32, shards=2) -> dict[str, np.ndarray]:
  directory.mkdir(parents=True)
  tensors = {k: v.astype(dtype) for k, v in release_tensors(params, cfg).items()}
  names = list(tensors)
  weight_map = {}
  if shards == 1:                                 # a single file and no index
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  for k in range(shards if shards > 1 else 0):
    file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[k::shards]}
    save_file(part, str(directory / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  if shards > 1:
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}))
  torch_dtype = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
  hf = flat_config_json(cfg, torch_dtype) if cfg.llm.is_moe else dense_config_json(cfg, torch_dtype)
  (directory / "config.json").write_text(json.dumps(hf))
  (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_json(cfg)))
  for name, text in SIDE_FILES.items():
    (directory / name).write_text(text)
  return tensors


# The MolmoE-1B release config.json (flat schema, the released config.json), as published.
MOLMOE_RELEASE_CONFIG = {
    "activation_type": "swiglu", "additional_vocab_size": 128, "alibi": False, "alibi_bias_max": 8.0,
    "always_start_with_space": True, "architectures": ["OLMoForCausalLM"], "attention_dropout": 0.0,
    "attention_layer_norm": True, "attention_layer_norm_with_affine": True, "attention_type": "sdpa",
    "attn_logit_softcapping": None,
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
    "max_sequence_length": 4096, "message_formatting": "role", "mlp_hidden_size": None, "mlp_ratio": 1,
    "model_type": "molmo", "moe_capacity_factor": 1.25, "moe_dropless": True, "moe_interleave": False,
    "moe_lbl_in_fp32": False, "moe_log_expert_assignment": False, "moe_loss_weight": 0.0,
    "moe_mlp_impl": "sparse", "moe_num_experts": 64, "moe_shared_expert": False, "moe_top_k": 8,
    "moe_zloss_weight": 0.0, "multi_query_attention": None, "n_heads": 16, "n_kv_heads": None,
    "n_layers": 16, "new_embedding_init_range": 0.02, "norm_after": False,
    "normalize_input_embeds": False, "overlap_margins": [4, 4], "pad_to": None, "pad_token_id": 1,
    "pad_tokenizer": False, "precision": "amp_bf16", "prompt_override": None,
    "prompt_type": "uber_model", "qkv_bias": False, "query_pre_attn_scalar": 224,
    "residual_dropout": 0.1, "response_attention_dropout": 0.0, "response_residual_dropout": 0.0,
    "rope": True, "rope_full_precision": True, "rope_impl": "llama", "rope_theta": 10000.0,
    "scale_logits": False, "system_prompt_kind": "demo_or_style", "transformers_version": "4.45.0.dev0",
    "unconditioned": False, "use_cache": True, "use_cls_feature": False, "use_col_tokens": True,
    "use_position_ids": True, "vision_backbone": {
        "attention_dropout": 0.0, "fsdp_wrap": False, "image_default_input_size": [336, 336],
        "image_dropout_rate": 0.0, "image_emb_dim": 1024, "image_head_dim": 64,
        "image_mlp_activations": "quick_gelu", "image_mlp_dim": 4096, "image_model_type": "openai",
        "image_norm_eps": 1e-05, "image_num_heads": 16, "image_num_key_value_heads": 16,
        "image_num_layers": 23, "image_num_pos": 577, "image_patch_size": 14,
        "image_pos_patch_size": 14, "initializer_range": 0.02, "residual_dropout": 0.0,
        "resize_mode": "default"},
    "vit_layers": [-2, -9], "vit_load_path": None, "vocab_size": 50280, "weight_tying": False,
}

# The Molmo-7B-D config.json (dense schema, the released config.json).
MOLMO_7B_D_CONFIG = {
    "architectures": ["MolmoForCausalLM"], "attention_layer_norm": False,
    "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                 "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
    "clip_qkv": None, "embedding_size": 152064, "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 37888, "layer_norm_eps": 1e-06, "layer_norm_type": "rms",
    "max_position_embeddings": 4096, "model_type": "molmo", "norm_after": False,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "qkv_bias": True,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "use_cache": True, "use_position_ids": True, "vocab_size": 152064, "weight_tying": False,
}


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny random models (every parameter O(1)-relevant) and their release directories
# ----------------------------------------------------------------------------------------------

def make_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  q, p, c = cfg.preprocess.pooled_per_crop, cfg.vision.num_patches, cfg.vision.patch_dim
  return {"input_ids": jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (1, T)), jnp.int32),
          "images": jnp.asarray(rng.standard_normal((1, CROPS, p, c)), jnp.float32),
          "image_masks": jnp.asarray(rng.choice([0.0, 0.4, 1.0], (1, CROPS, p)), jnp.float32),
          "image_input_idx": jnp.asarray(np.arange(1, 1 + CROPS * q).reshape(1, CROPS, q), jnp.int32)}


def random_params(cfg, batch, seed=1):
  abstract = nn.unbox(jax.eval_shape(Molmo(cfg).init, jax.random.PRNGKey(0), batch)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    base = 1.0 if name == "scale" else 0.0
    scale = 0.1 if name in ("scale", "bias") else (1.0 if name in ("pad_embed", "pretrained", "new") else 0.15)
    return (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def logits_fn(cfg):
  model = Molmo(cfg)
  return jax.jit(lambda params, batch: model.apply({"params": params}, batch)[0])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  cfg = C.tiny(request.param)
  batch = make_batch(cfg)
  params = random_params(cfg, batch)
  root = tmp_path_factory.mktemp(request.param)
  tensors = write_release_dir(root / "hf", params, cfg)
  return dict(name=request.param, cfg=cfg, batch=batch, params=params, root=root, tensors=tensors)


@pytest.fixture(scope="module")
def imported(family):
  out = convert_hf_to_orbax(family["root"] / "hf", family["root"] / "orbax")
  return out, load_model_checkpoint(out)


def assert_same_tensors(directory: Path, expected: dict[str, np.ndarray]):
  got = {}
  for file in sorted(directory.glob("*.safetensors")):
    got.update(load_file(str(file)))
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    assert got[name].tobytes() == want.tobytes(), f"{name} differs"


def no_leftovers(parent: Path):
  return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# HF release -> Orbax
# ----------------------------------------------------------------------------------------------

def test_import_gives_the_same_model(family, imported):
  out, ckpt = imported
  assert ckpt.config.replace(name="x", param_dtype="float32") == family["cfg"].replace(name="x")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ckpt.params, family["params"])
  # Same network (config checked above), so one compiled function serves both parameter sets.
  want = logits_fn(family["cfg"])(family["params"], family["batch"])
  got = logits_fn(family["cfg"])(ckpt.params, family["batch"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  assert sorted(p.name for p in ckpt.tokenizer_dir.iterdir()) == sorted(
      [*SIDE_FILES, "preprocessor_config.json"])
  assert no_leftovers(out.parent) == []


def test_loaded_checkpoint_restores_with_an_expected_tree(family, imported):
  out, _ = imported
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), family["params"])
  ckpt = load_model_checkpoint(out, expected_params=abstract)
  leaf = ckpt.params["llm"]["lm_head"]
  assert leaf.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(leaf, np.float32),
                                np.asarray(family["params"]["llm"]["lm_head"]).astype(jnp.bfloat16).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Orbax -> HF release
# ----------------------------------------------------------------------------------------------

def test_export_round_trip_is_bit_identical(family, imported):
  out, _ = imported
  hf = convert_orbax_to_hf(out, family["root"] / "exported", max_shard_bytes=20_000)
  assert_same_tensors(hf, family["tensors"])
  index = json.loads((hf / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  src = family["root"] / "hf"
  for name in ("config.json", "preprocessor_config.json", *SIDE_FILES):
    assert json.loads((hf / name).read_text()) == json.loads((src / name).read_text()), name


def test_exporter_matches_the_independent_writer(family, tmp_path):
  """Our params saved by the training checkpointer -> exporter == the test-side layout; then the
  exported directory imports back (through small row blocks) to the same logits."""
  model_dir = save_model_checkpoint(tmp_path / "trained", family["params"], family["cfg"])
  hf = convert_orbax_to_hf(model_dir, tmp_path / "hf", block_bytes=4096)
  assert_same_tensors(hf, family["tensors"])
  back = load_model_checkpoint(convert_hf_to_orbax(hf, tmp_path / "again", block_bytes=4096))
  assert back.config.replace(name="x") == family["cfg"].replace(name="x")
  np.testing.assert_array_equal(np.asarray(logits_fn(family["cfg"])(back.params, family["batch"])),
                                np.asarray(logits_fn(family["cfg"])(family["params"], family["batch"])))


def test_bfloat16_release_round_trips(tmp_path):
  cfg = C.tiny("olmoe")
  batch = make_batch(cfg)
  params = random_params(cfg, batch)
  tensors = write_release_dir(tmp_path / "hf", params, cfg, dtype=ml_dtypes.bfloat16, shards=1)
  out = convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
  ckpt = load_model_checkpoint(out)
  assert ckpt.config.param_dtype == "bfloat16"
  assert np.asarray(ckpt.params["llm"]["blocks"]["moe"]["gate"]).dtype == jnp.bfloat16
  assert_same_tensors(convert_orbax_to_hf(out, tmp_path / "back"), tensors)
  as_fp32 = convert_orbax_to_hf(out, tmp_path / "fp32", dtype="float32")
  assert json.loads((as_fp32 / "config.json").read_text())["torch_dtype"] == "float32"
  assert_same_tensors(as_fp32, {k: v.astype(np.float32) for k, v in tensors.items()})


# ----------------------------------------------------------------------------------------------
# config.json schemas
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hf, preset", [(MOLMO_7B_D_CONFIG, "molmo-7b-d"),
                                        (MOLMOE_RELEASE_CONFIG, "molmoe-1b")])
def test_release_configs_parse_to_presets_and_round_trip(hf, preset):
  cfg = release_config.config_from_release(hf)
  assert cfg.name == preset
  want = C.preset(preset)
  assert cfg.replace(llm=dataclasses.replace(cfg.llm, residual_dropout=0.0)) == want
  back = release_config.release_config_json(cfg, torch_dtype="float32")
  dropped = {"transformers_version"}
  assert back == {**{k: v for k, v in hf.items() if k not in dropped}, "torch_dtype": "float32"}


def test_other_presets_export_and_parse_back():
  for preset in ("molmo-72b", "molmo-7b-o"):
    cfg = C.preset(preset)
    hf = release_config.release_config_json(cfg, torch_dtype="bfloat16")
    assert set(hf) == set(MOLMO_7B_D_CONFIG), preset     # no native overrides for a release model
    assert release_config.config_from_release(hf) == cfg


# Native keys a dense-schema config.json may carry, with values we implement (seen in configs
# written by the native code).
NATIVE_EXTRAS = {"block_type": "sequential", "max_sequence_length": 4096,
                 "fix_image_padding": False, "pad_value": 0.0, "remove_black_pads": False,
                 "n_layers": 28, "n_heads": 28, "n_kv_heads": 4, "mlp_ratio": 4,
                 "mlp_hidden_size": 37888, "moe_num_experts": 8, "moe_top_k": 2,
                 "residual_dropout": 0.0, "multi_annotation_weighting": "root_subsegments",
                 "tokenizer": {"identifier": "Qwen/Qwen2-7B", "tokenizer_dir": None}}


def test_dense_config_accepts_native_keys_with_implemented_values():
  want = release_config.config_from_release(MOLMO_7B_D_CONFIG)
  assert release_config.config_from_release({**MOLMO_7B_D_CONFIG, **NATIVE_EXTRAS}) == want
  changed = release_config.config_from_release(
      {**MOLMO_7B_D_CONFIG, "fix_image_padding": True, "pad_value": 0.5,
       "residual_dropout": 0.1})
  assert changed.preprocess.fix_image_padding and changed.preprocess.pad_value == 0.5
  assert changed.llm.residual_dropout == 0.1
  assert changed.replace(preprocess=want.preprocess, llm=want.llm) == want.replace(name=changed.name)
  # Without max_position_embeddings the native max_sequence_length is the RoPE length.
  rope = {k: v for k, v in MOLMO_7B_D_CONFIG.items() if k != "max_position_embeddings"}
  assert release_config.config_from_release(
      {**rope, "max_sequence_length": 2048}).llm.rope_max_length == 2048
  # A dropout written back by export reads back.
  again = release_config.release_config_json(want.replace(llm=changed.llm), torch_dtype="float32")
  assert again["residual_dropout"] == 0.1
  assert release_config.config_from_release(again).llm.residual_dropout == 0.1


def test_flat_config_accepts_the_dense_names_when_they_agree():
  hf = {**MOLMOE_RELEASE_CONFIG, "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 2048,
        "fix_image_padding": False, "pad_value": 0}
  assert release_config.config_from_release(hf) == release_config.config_from_release(
      MOLMOE_RELEASE_CONFIG)


@pytest.mark.parametrize("schema, key, value, message", [
    ("dense", "block_type", "llama", "block_type='llama' is not supported"),
    ("dense", "block_type", "moe", "block_type='moe' .* MolmoE schema"),
    ("flat", "block_type", "llama", "block_type='llama' is not supported"),
    ("dense", "max_sequence_length", 0, "max_sequence_length must be positive"),
    ("dense", "max_sequence_length", "long", "max_sequence_length must be int"),
    ("dense", "fix_image_padding", "yes", "fix_image_padding must be bool"),
    ("flat", "fix_image_padding", 1, "fix_image_padding must be bool"),
    ("dense", "pad_value", "black", "pad_value must be int/float"),
    ("dense", "pad_value", True, "pad_value must be int/float"),
    ("dense", "remove_black_pads", True, "remove_black_pads=True is not supported"),
    ("dense", "n_layers", 27, "n_layers=27 disagrees with num_hidden_layers"),
    ("dense", "n_kv_heads", 28, "n_kv_heads=28 disagrees with num_key_value_heads"),
    ("dense", "mlp_hidden_size", 100, "mlp_hidden_size=100 disagrees with intermediate_size"),
    ("dense", "mlp_ratio", 3, "mlp_ratio=3 .* disagrees with intermediate_size"),
    ("flat", "hidden_size", 1024, "hidden_size=1024 disagrees with d_model"),
    ("dense", "residual_dropout", 1.5, "residual_dropout must be a number in"),
    ("dense", "pad_to", 64, "pad_to=64 is not supported"),
])
def test_unimplemented_native_values_are_refused_with_the_key(schema, key, value, message):
  hf = MOLMO_7B_D_CONFIG if schema == "dense" else MOLMOE_RELEASE_CONFIG
  with pytest.raises(ValueError, match=message):
    release_config.config_from_release({**hf, key: value})


def test_a_dense_release_dir_with_native_keys_converts(tmp_path):
  hf = _fresh_release(tmp_path)
  cfg_json = json.loads((hf / "config.json").read_text())
  extras = {"block_type": "sequential", "fix_image_padding": False, "pad_value": 0.0,
            "max_sequence_length": cfg_json["max_position_embeddings"]}
  (hf / "config.json").write_text(json.dumps({**cfg_json, **extras}))
  out = convert_hf_to_orbax(hf, tmp_path / "out")
  assert C.MolmoConfig.from_json((out / "config.json").read_text()) == \
      release_config.config_from_release_dir(hf)


# ----------------------------------------------------------------------------------------------
# Errors: nothing that looks like a checkpoint is left behind
# ----------------------------------------------------------------------------------------------

def _fresh_release(tmp_path):
  cfg = C.tiny("qwen2")
  params = random_params(cfg, make_batch(cfg))
  write_release_dir(tmp_path / "hf", params, cfg)
  return tmp_path / "hf"


def _shards(hf):
  return sorted(hf.glob("*.safetensors"))


def _rewrite_shard(path, edit):
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))


@pytest.mark.parametrize("damage, error, message", [
    (lambda hf: _shards(hf)[1].unlink(), FileNotFoundError, "missing"),
    (lambda hf: _shards(hf)[0].write_bytes(_shards(hf)[0].read_bytes()[:-100]), ValueError, "truncated"),
    (lambda hf: (hf / "config.json").write_text(json.dumps(
        {**json.loads((hf / "config.json").read_text()), "model_type": "qwen2"})), ValueError, "model_type"),
    (lambda hf: (hf / "config.json").write_text(json.dumps(
        {**json.loads((hf / "config.json").read_text()), "sliding_window": 4})), ValueError, "sliding_window"),
    (lambda hf: _rewrite_shard(_shards(hf)[0], lambda t: t.update(
        {k: np.zeros((3, 3), np.float32) for k in list(t)[:1]})), ValueError, "shape mismatch"),
    (lambda hf: _rewrite_shard(_shards(hf)[0], lambda t: t.update(
        {"model.transformer.blocks.9.att_proj.weight": np.zeros((3,), np.float32)})),
     ValueError, "unexpected: model.transformer.blocks.9.att_proj.weight"),
    (lambda hf: _rewrite_shard(_shards(hf)[1], lambda t: t.pop(sorted(t)[0])), ValueError, "index"),
])
def test_bad_release_dirs_fail_clearly(tmp_path, damage, error, message):
  hf = _fresh_release(tmp_path)
  damage(hf)
  with pytest.raises(error, match=message):
    convert_hf_to_orbax(hf, tmp_path / "out")
  assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  hf = _fresh_release(tmp_path)
  from convert import safetensors_io
  real_read, calls = safetensors_io.SafetensorsDir.read, []

  def flaky(self, name, rows=None):
    calls.append(name)
    if len(calls) == 20:
      raise OSError("disk on fire")
    return real_read(self, name, rows)

  monkeypatch.setattr(safetensors_io.SafetensorsDir, "read", flaky)
  with pytest.raises(Exception, match="disk on fire"):
    convert_hf_to_orbax(hf, tmp_path / "out")
  assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_a_missing_tensor_is_listed(tmp_path):
  hf = _fresh_release(tmp_path)
  index = json.loads((hf / "model.safetensors.index.json").read_text())
  gone = "model.transformer.blocks.1.ff_proj.weight"
  _rewrite_shard(hf / index["weight_map"][gone], lambda t: t.pop(gone))
  index["weight_map"].pop(gone)
  (hf / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=f"missing: {gone}"):
    convert_hf_to_orbax(hf, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

def test_inspect_lists_both_formats(family, imported, capsys):
  out, _ = imported
  total = sum(int(np.prod(v.shape)) for v in family["tensors"].values())
  for target in (family["root"] / "hf", out):
    inspect_cli.main([str(target)])
    text = capsys.readouterr().out
    assert f"{total:,} parameters" in text
  assert "llm/lm_head" in text and f"{family['cfg'].llm.d_model}, {family['cfg'].llm.embedding_size}" in text
