"""Converter mechanics: shards, bf16, fused experts, CLIPModel dirs, clear errors, build_initial.

Legend: L layers, E experts, D width, V vocab rows, A additional rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import build_initial as bi  # noqa: E402
from convert import hf_components as hfc  # noqa: E402
from convert.safetensors_io import SafetensorsDir  # noqa: E402
from molmo_jax import config as C  # noqa: E402
from molmo_jax.models.molmo import Molmo  # noqa: E402
from molmo_jax.model_dir import load_model_checkpoint, path_name  # noqa: E402


def qwen2_model(layers: int = 2, seed: int = 0):
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=90,
                                 tie_word_embeddings=False)
  return transformers.Qwen2ForCausalLM(cfg)


def tiny_clip_config(**kw):
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=32, patch_size=4, **kw)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  model = qwen2_model()
  path = tmp_path_factory.mktemp("qwen2") / "single"
  model.save_pretrained(path)
  return model, path


def convert(directory, **overrides):
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory), **overrides)
  return cfg, hfc.convert_llm(directory, cfg)


def rewrite(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
  """Copy of a single-file HF directory with its tensors and/or config.json edited."""
  shutil.copytree(src, dst)
  if edit_tensors is not None:
    tensors = load_file(dst / "model.safetensors")
    edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors")
  if edit_config is not None:
    cfg = json.loads((dst / "config.json").read_text())
    edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [path_name(p) for p, _ in flat_a] == [path_name(p) for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=path_name(path))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def test_sharded_checkpoint_with_index_equals_single_file(qwen2_dir, tmp_path):
  model, single = qwen2_dir
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="40KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("*.safetensors"))) > 2
  assert_trees_equal(convert(sharded)[1], convert(single)[1])


def test_layout_of_converted_qwen2(qwen2_dir):
  model, directory = qwen2_dir
  cfg, params = convert(directory)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  q = params["blocks"]["attention"]["query"]
  # q_proj [H*h, D] -> [L, D, H, h]; head n = rows n*h..(n+1)*h of the torch weight.
  np.testing.assert_array_equal(q["kernel"][1, :, 3, :],
                                sd["model.layers.1.self_attn.q_proj.weight"][48:64].T)
  np.testing.assert_array_equal(q["bias"][0, 2], sd["model.layers.0.self_attn.q_proj.bias"][32:48])
  out = params["blocks"]["attention"]["out"]["kernel"]
  np.testing.assert_array_equal(out[0].reshape(64, 64),
                                sd["model.layers.0.self_attn.o_proj.weight"].T)
  np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
  assert params["blocks"]["attention"]["key"]["kernel"].shape == (2, 64, 2, 16)
  assert params["blocks"]["mlp"]["down"]["kernel"].shape == (2, 96, 64)


def test_bf16_source_is_read_and_widened(tmp_path):
  model = qwen2_model(seed=1).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  with open(next((tmp_path / "bf16").glob("*.safetensors")), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["model.norm.weight"]["dtype"] == "BF16"
  reader = SafetensorsDir(tmp_path / "bf16")
  assert str(reader.read("model.norm.weight").dtype) == "bfloat16"
  _, params = convert(tmp_path / "bf16")
  want = model.state_dict()["model.layers.1.mlp.up_proj.weight"].float().numpy().T
  got = params["blocks"]["mlp"]["up"]["kernel"][1]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_fused_experts_equal_per_expert_tensors(tmp_path):
  torch.manual_seed(0)
  hf_cfg = transformers.OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=90,
                                    num_experts=8, num_experts_per_tok=2, pad_token_id=None,
                                    eos_token_id=None, bos_token_id=None)
  model = transformers.OlmoeForCausalLM(hf_cfg)
  model.save_pretrained(tmp_path / "per_expert")                # on disk: experts.{e}.*_proj
  fused = tmp_path / "fused"
  shutil.copytree(tmp_path / "per_expert", fused)
  (fused / "model.safetensors").unlink()
  state = {k: v.contiguous().numpy() for k, v in model.state_dict().items()}   # in memory: fused
  assert "model.layers.0.mlp.experts.gate_up_proj" in state
  save_file(state, fused / "model.safetensors")
  cfg, from_fused = convert(fused)
  assert_trees_equal(from_fused, convert(tmp_path / "per_expert")[1])
  assert from_fused["blocks"]["moe"]["gate"].shape == (2, 8, 64, 32)
  assert from_fused["blocks"]["moe"]["down"].shape == (2, 8, 32, 64)
  assert cfg.is_moe and cfg.experts_per_token == 2 and not cfg.moe_normalize_topk


def test_clip_model_directory_ignores_text_tower(tmp_path):
  torch.manual_seed(0)
  clip_cfg = transformers.CLIPConfig(vision_config=tiny_clip_config().to_dict(), text_config=dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1))
  clip = transformers.CLIPModel(clip_cfg)
  clip.save_pretrained(tmp_path / "clip")
  vision_only = tmp_path / "vision_only"
  vision_only.mkdir()
  save_file({k: v.contiguous().numpy() for k, v in clip.vision_model.state_dict().items()},
            vision_only / "model.safetensors")
  (vision_only / "config.json").write_text(json.dumps(
      dict(clip_cfg.vision_config.to_dict(), model_type="clip_vision_model")))

  cfg = hfc.vision_config_from_hf(hfc.read_hf_config(tmp_path / "clip"), selected_layers=(-1,))
  assert cfg.num_layers == 3                                    # CLIP's last block dropped
  params = hfc.convert_clip(tmp_path / "clip", cfg)
  assert_trees_equal(params, hfc.convert_clip(vision_only, cfg))
  conv = clip.vision_model.embeddings.patch_embedding.weight.detach().numpy()     # [Dv, 3, p, p]
  # Row (dy, dx, c) of our kernel holds conv[:, c, dy, dx].
  np.testing.assert_array_equal(params["patch_embed"]["kernel"][(1 * 4 + 2) * 3 + 0],
                                conv[:, 0, 1, 2])
  assert params["blocks"]["fc1"]["kernel"].shape == (3, 32, 64)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_unknown_model_type_is_named(qwen2_dir, tmp_path):
  llama = rewrite(qwen2_dir[1], tmp_path / "llama",
                  edit_config=lambda c: c.update(model_type="llama"))
  with pytest.raises(ValueError, match="model_type 'llama' is not supported.*qwen2"):
    hfc.llm_config_from_hf(hfc.read_hf_config(llama))
  with pytest.raises(ValueError, match="model_type 'llama'"):
    hfc.convert_llm(llama, C.tiny("qwen2").llm)
  with pytest.raises(ValueError, match="model_type 'siglip_vision_model'"):
    hfc.vision_config_from_hf({"model_type": "siglip_vision_model"})


@pytest.mark.parametrize("field, value, message", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_parameters", {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0},
     "rope_type 'yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
])
def test_unsupported_settings_are_refused(qwen2_dir, field, value, message):
  hf = dict(hfc.read_hf_config(qwen2_dir[1]), **{field: value})
  with pytest.raises(ValueError, match=message):
    hfc.llm_config_from_hf(hf)


def test_missing_tensors_are_listed(qwen2_dir, tmp_path):
  def drop(t):
    del t["model.layers.1.self_attn.k_proj.bias"], t["model.norm.weight"]
  broken = rewrite(qwen2_dir[1], tmp_path / "missing", edit_tensors=drop)
  with pytest.raises(ValueError, match=r"2 tensor\(s\) .* missing") as e:
    convert(broken)
  assert "model.layers.1.self_attn.k_proj.bias" in str(e.value)
  assert "model.norm.weight" in str(e.value)


def test_extra_tensors_are_listed(qwen2_dir, tmp_path):
  def add(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  broken = rewrite(qwen2_dir[1], tmp_path / "extra", edit_tensors=add)
  with pytest.raises(ValueError,
                     match=r"unexpected tensor.*model\.layers\.0\.self_attn\.o_proj\.bias"):
    convert(broken)


def test_shape_mismatch_names_tensor_and_shapes(qwen2_dir, tmp_path):
  broken = rewrite(qwen2_dir[1], tmp_path / "shape",
                   edit_config=lambda c: c.update(intermediate_size=80))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: \(96, 64\), "
                                       r"expected \(80, 64\)"):
    convert(broken)


def test_vocab_larger_than_embedding_size_is_refused(qwen2_dir):
  with pytest.raises(ValueError, match="vocab_size 90 exceeds llm.embedding_size 64"):
    convert(qwen2_dir[1], embedding_size=64)


def test_selected_vit_layers_outside_tower(tmp_path):
  hf = dict(tiny_clip_config().to_dict(), model_type="clip_vision_model")
  with pytest.raises(ValueError, match="-9 is outside a 3-block tower"):
    hfc.vision_config_from_hf(hf)                               # Molmo's default (-2, -9)


# --------------------------------------------------------------------------------------------
# build_initial
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def component_dirs(tmp_path_factory, qwen2_dir):
  root = tmp_path_factory.mktemp("components")
  torch.manual_seed(1)
  transformers.CLIPVisionModel(tiny_clip_config()).save_pretrained(root / "clip")
  llm = root / "llm"
  shutil.copytree(qwen2_dir[1], llm)
  (llm / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
  return root / "clip", llm


def test_build_initial_end_to_end(component_dirs, tmp_path):
  clip_dir, llm_dir = component_dirs
  bi.main(["--clip", str(clip_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "model"),
           "--vit-layers=-1,-3", "--embedding-size", "96", "--seed", "3"])
  cfg = C.MolmoConfig.from_json((tmp_path / "model" / "config.json").read_text())
  assert cfg.vision.num_layers == 3 and cfg.vision.selected_layers == (-1, -3)
  assert (cfg.llm.embedding_size, cfg.llm.vocab_size) == (96, 90)
  assert cfg.llm.additional_vocab_size == 128
  assert cfg.connector.projector_hidden == 96 and cfg.connector.pool_heads == 4

  expected = bi.expected_param_shapes(cfg)
  loaded = load_model_checkpoint(tmp_path / "model", expected_params=expected)
  assert (loaded.tokenizer_dir / "tokenizer_config.json").is_file()
  params = loaded.params
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, expected)

  # Components come from the HF directories ...
  assert_trees_equal(params["vision"], hfc.convert_clip(clip_dir, cfg.vision))
  llm_cfg = cfg.llm
  converted = hfc.convert_llm(llm_dir, llm_cfg)
  np.testing.assert_array_equal(params["llm"]["blocks"]["attention"]["query"]["bias"],
                                converted["blocks"]["attention"]["query"]["bias"])
  np.testing.assert_array_equal(params["llm"]["embedding"]["pretrained"][:90],
                                converted["embedding"]["pretrained"][:90])
  # ... and the new parts are initialised as the reference does.
  connector = params["connector"]
  np.testing.assert_array_equal(connector["pad_embed"], 0.0)
  for name in ("query", "key", "value", "out"):
    np.testing.assert_array_equal(connector["pooling"][name]["bias"], 0.0)
  for kernel in (connector["pooling"]["query"]["kernel"], connector["projector"]["down"]["kernel"],
                 params["llm"]["embedding"]["new"]):
    assert abs(float(np.std(kernel)) - 0.02) < 0.003 and abs(float(np.mean(kernel))) < 0.003
  assert params["llm"]["embedding"]["new"].shape == (128, 64)

  # The model runs on the written parameters.
  batch = bi.dummy_batch(cfg)
  batch["input_ids"] = jnp.arange(8, dtype=jnp.int32)[None]
  logits, _ = jax.jit(Molmo(cfg).apply)({"params": params}, batch)
  assert logits.shape == (1, 8, 96) and bool(jnp.all(jnp.isfinite(logits)))


def test_build_initial_checks_preset(component_dirs, tmp_path):
  clip_dir, llm_dir = component_dirs
  with pytest.raises(ValueError,
                     match="do not fit preset 'molmo-7b-d'.*llm.d_model: HF 64, preset 3584"):
    bi.build_initial(clip_dir, llm_dir, tmp_path / "model", preset="molmo-7b-d", vit_layers=(-1,))
  assert not (tmp_path / "model").exists()


# config.json of each release's base components, with the sizes of the reference's olmo/image_vit.py (CLIP ViT-L/14-336) / the reference's launch_scripts/utils.py (model presets) (no weights).
# Numeric-only fields (eps, RoPE) may differ from the preset: the preset wins, with a notice.
_CLIP_L14_336 = {"model_type": "clip", "vision_config": {
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
    "num_hidden_layers": 24, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5}}
_BASE_LLMS = {
    "molmo-7b-d": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
                   "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "use_sliding_window": False,
                   "sliding_window": 131072, "tie_word_embeddings": False, "hidden_act": "silu"},
    "molmo-72b": {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
                  "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 152064,
                  "tie_word_embeddings": False},
    "molmo-7b-o": {"model_type": "olmo2", "hidden_size": 4096, "intermediate_size": 11008,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
                   "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 5e5,
                                                              "rope_type": "default"},
                   "vocab_size": 100278, "attention_bias": False},
    "molmoe-1b": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 16,
                  "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
                  "rms_norm_eps": 1e-5, "rope_theta": 1e4, "vocab_size": 50304,
                  "clip_qkv": None},
}


@pytest.mark.parametrize("preset", sorted(_BASE_LLMS))
def test_base_component_configs_fit_the_presets(preset, capsys):
  derived = bi.derived_config(_CLIP_L14_336, _BASE_LLMS[preset])
  assert derived.vision.num_layers == 23 and derived.vision.resolved_layers() == (21, 14)
  assert bi.reconcile_with_preset(derived, C.preset(preset)) == C.preset(preset)
  if preset == "molmo-7b-d":   # Molmo's RoPE table is 4096 long, not Qwen2's 131072
    assert "llm.rope_max_length: HF 131072 -> preset 4096" in capsys.readouterr().err
