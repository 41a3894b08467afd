"""Parity with transformers: tiny random HF model -> save_pretrained -> our converter -> our module.

Legend: B batch, T tokens, V vocab, P patches, p patch side, Dv ViT width.

Every HF parameter is re-drawn (norm scales around 1, biases non-zero) so that a swapped norm,
a missing bias or a transposed kernel changes the output. Max |diff| is printed (pytest -s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import hf_components as hfc  # noqa: E402
from molmo_jax.models.decoder import Decoder  # noqa: E402
from molmo_jax.models.molmo import default_positions, text_attention_mask  # noqa: E402
from molmo_jax.models.vit import VisionTransformer  # noqa: E402

TOL = 1e-4
VOCAB = 90


def randomize(model: "torch.nn.Module", seed: int, std: float = 0.1) -> None:
  """Re-draws every parameter: 1-D `weight`s (norm scales) ~ 1 + N(0, 0.3), the rest N(0, std)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.3 * noise if p.ndim == 1 and name.endswith("weight") else std * noise)


def save(model, path) -> str:
  model.save_pretrained(path)
  return str(path)


# The parity models (tests/test_capture.py checks their hidden states and routing too):
# family -> (config class, model class, config fields, randomize seed, randomize std).
_NO_SPECIAL_IDS = dict(pad_token_id=None, eos_token_id=None, bos_token_id=None)
HF_MODELS = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=4), 0, 0.1),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False), 1, 0.1),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, rope_theta=5e5, rms_norm_eps=1e-6,
        **_NO_SPECIAL_IDS), 2, 0.1),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, rope_theta=1e4, rms_norm_eps=1e-5, **_NO_SPECIAL_IDS), 3, 0.2),
}


def hf_model(family: str) -> "torch.nn.Module":
  """A tiny transformers model of `family` (HF_MODELS) with every parameter re-drawn."""
  config_cls, model_cls, fields, seed, std = HF_MODELS[family]
  hf_cfg = getattr(transformers, config_cls)(attn_implementation="eager", **fields)
  model = getattr(transformers, model_cls)(hf_cfg).eval()
  randomize(model, seed=seed, std=std)
  return model


def report(label: str, ours: np.ndarray, theirs: np.ndarray) -> float:
  diff = float(np.max(np.abs(ours - theirs)))
  print(f"\n[parity] {label}: max |diff| = {diff:.3e} (max |value| {np.max(np.abs(theirs)):.3f})")
  return diff


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------

def clip_patches(pixels: np.ndarray, p: int) -> np.ndarray:
  """pixel_values [B, 3, H, W] -> [B, P, p*p*3] in (dy, dx, c) order, row-major patches."""
  b, c, h, w = pixels.shape
  x = pixels.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


@pytest.mark.parametrize("drop_last_layer", [False, True])
def test_vision_tower_matches_clip(tmp_path, drop_last_layer):
  hf = hf_model("clip")
  directory = save(hf, tmp_path / "clip")

  layers = 2 if drop_last_layer else 3
  cfg = hfc.vision_config_from_hf(hfc.read_hf_config(directory), drop_last_layer=drop_last_layer,
                                  selected_layers=tuple(range(layers)))
  assert cfg.num_layers == layers and cfg.activation == "quick_gelu"
  params = hfc.convert_clip(directory, cfg)

  pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    hidden = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  patches = jnp.asarray(clip_patches(pixels, 4))
  ours = jax.jit(VisionTransformer(cfg).apply)({"params": params}, patches)
  for i, block_out in enumerate(ours):
    # HF hidden_states[0] is the embedding after pre_layrnorm; block i's output is [i + 1].
    diff = report(f"CLIP block {i} (drop_last={drop_last_layer})", np.asarray(block_out),
                  hidden[i + 1].numpy())
    assert diff <= TOL


# --------------------------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------------------------

def decoder_logits(params: dict, cfg, ids: np.ndarray) -> np.ndarray:
  """Our decoder on ids [B, T] (-1 = padding) -> logits [B, T, V_emb]."""
  params = dict(params, embedding=dict(
      params["embedding"], new=jnp.zeros((cfg.additional_vocab_size, cfg.d_model))))
  decoder = Decoder(cfg)

  @jax.jit
  def run(params, ids):
    x = decoder.apply({"params": params}, jnp.where(ids != -1, ids, 0), method=Decoder.embed)
    return decoder.apply({"params": params}, x, default_positions(ids), text_attention_mask(ids))[0]

  return np.asarray(run(params, jnp.asarray(ids)))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  mask = ids != -1
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.where(mask, ids, 0)).long(),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
  return out.logits.numpy()


def token_batch(lengths: list[int], t: int, seed: int) -> np.ndarray:
  """Right-padded ids [B, T]: row b has lengths[b] real tokens then -1."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (len(lengths), t))
  ids[np.arange(t)[None, :] >= np.asarray(lengths)[:, None]] = -1
  return ids.astype(np.int32)


def compare(label: str, model, directory: str, ids: np.ndarray, **overrides) -> None:
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory), **overrides)
  params = hfc.convert_llm(directory, cfg)
  ours, theirs = decoder_logits(params, cfg, ids), hf_logits(model, ids)
  valid = ids != -1
  diff = report(label, ours[valid][:, :VOCAB], theirs[valid])
  assert diff <= TOL
  # Columns added to reach embedding_size have zero LM-head weights, hence zero logits.
  np.testing.assert_array_equal(ours[..., VOCAB:], 0.0)


def test_qwen2_matches_hf_with_right_padding(tmp_path):
  model = hf_model("qwen2")
  directory = save(model, tmp_path / "qwen2")
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory))
  assert (cfg.qkv_bias, cfg.num_kv_heads, cfg.norm_placement) == (True, 2, "pre")
  assert cfg.rope_theta == 1e6
  compare("Qwen2 (GQA 4:2, qkv bias, right-padded)", model, directory,
          token_batch([12, 7, 3], 12, seed=0))


def test_olmo2_matches_hf(tmp_path):
  model = hf_model("olmo2")
  directory = save(model, tmp_path / "olmo2")
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory))
  assert (cfg.norm_placement, cfg.qk_norm, cfg.qkv_bias) == ("post", True, False)
  # embedding_size 96 > HF vocab 90, as Molmo-7B-O pads OLMo's table.
  compare("OLMo2 (post-norm, full-width qk-norm, padded vocab)", model, directory,
          token_batch([10, 6], 10, seed=1), embedding_size=96)


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
  model = hf_model("olmoe")
  return model, save(model, tmp_path_factory.mktemp("olmoe") / "olmoe")


@pytest.mark.parametrize("moe_impl", ["ragged", "capacity"])
def test_olmoe_matches_hf(olmoe_dir, moe_impl):
  model, directory = olmoe_dir
  # Capacity factor E/k gives every expert room for every token of a row: nothing is dropped.
  compare(f"OLMoE (8 experts, top-2, {moe_impl})", model, directory,
          token_batch([12, 9], 12, seed=2), moe_impl=moe_impl, moe_capacity_factor=8 / 2)


def test_olmoe_routing_uses_several_experts(olmoe_dir):
  """Guards the MoE parity test against a degenerate router that sends everything one way."""
  model, directory = olmoe_dir
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory))
  params = hfc.convert_llm(directory, cfg)
  x = params["embedding"]["pretrained"][:VOCAB]
  chosen = np.argsort(-(x @ params["blocks"]["moe"]["router"][0]), axis=-1)[:, :2]
  assert len(np.unique(chosen)) >= 6
