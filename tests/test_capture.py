"""Captured intermediates (molmo_jax.models.capture): parity with transformers' hidden states and
router choices on the parity models, the full model's plumbing, and zero cost when off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import hf_components as hfc  # noqa: E402
from molmo_jax import config as C  # noqa: E402
from molmo_jax.models import capture  # noqa: E402
from molmo_jax.models.decoder import Decoder  # noqa: E402
from molmo_jax.models.molmo import Molmo, default_positions, text_attention_mask  # noqa: E402
from molmo_jax.models.vit import VisionTransformer  # noqa: E402
from test_parity_hf import (TOL, clip_patches, hf_model, report, save,  # noqa: E402
                            token_batch)


def decoder_capture(directory: str, ids: np.ndarray, groups=("decoder",), **overrides):
  """Our decoder on ids [B, T] with `groups` captured -> (out, captured)."""
  cfg = hfc.llm_config_from_hf(hfc.read_hf_config(directory), **overrides)
  params = hfc.convert_llm(directory, cfg)
  params = dict(params, embedding=dict(
      params["embedding"], new=jnp.zeros((cfg.additional_vocab_size, cfg.d_model))))
  decoder = Decoder(cfg)
  mutable = [capture.collection(g) for g in groups]

  @jax.jit
  def run(params, ids):
    x = decoder.apply({"params": params}, jnp.where(ids != -1, ids, 0), method=Decoder.embed)
    (_, out), state = decoder.apply({"params": params}, x, default_positions(ids),
                                    text_attention_mask(ids), mutable=mutable)
    return out["hidden"], capture.collect(state, tuple(groups))

  return cfg, run(params, jnp.asarray(ids))


def hf_outputs(model, ids: np.ndarray, **kwargs):
  mask = ids != -1
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(np.where(mask, ids, 0)).long(),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 output_hidden_states=True, **kwargs)


def check_hidden_states(label: str, model, directory: str, ids: np.ndarray, **overrides):
  """Every entry of transformers' hidden_states against ours, on the real (unpadded) tokens."""
  cfg, (final, captured) = decoder_capture(directory, ids, **overrides)
  hidden = hf_outputs(model, ids).hidden_states
  layers = np.asarray(captured["decoder_layers"])
  assert len(hidden) == cfg.num_layers + 1 and layers.shape[0] == cfg.num_layers
  valid = ids != -1
  ours = [np.asarray(captured["decoder_embeddings"])] + list(layers[:-1]) + [np.asarray(final)]
  for i, (mine, theirs) in enumerate(zip(ours, hidden)):
    assert report(f"{label} hidden_states[{i}]", mine[valid], theirs.numpy()[valid]) <= TOL
  return cfg, captured


def test_qwen2_hidden_states_match_hf(tmp_path):
  model = hf_model("qwen2")
  check_hidden_states("Qwen2", model, save(model, tmp_path / "qwen2"),
                      token_batch([12, 7, 3], 12, seed=0))


def test_olmo2_hidden_states_match_hf(tmp_path):
  model = hf_model("olmo2")
  check_hidden_states("OLMo2", model, save(model, tmp_path / "olmo2"),
                      token_batch([10, 6], 10, seed=1), embedding_size=96)


@pytest.mark.parametrize("moe_impl", ["ragged", "capacity"])
def test_olmoe_hidden_states_and_routing_match_hf(tmp_path, moe_impl):
  model = hf_model("olmoe")
  directory = save(model, tmp_path / "olmoe")
  ids = token_batch([12, 9], 12, seed=2)
  check_hidden_states(f"OLMoE ({moe_impl})", model, directory, ids, moe_impl=moe_impl,
                      moe_capacity_factor=8 / 2)
  _, (_, captured) = decoder_capture(directory, ids, groups=("router",), moe_impl=moe_impl,
                                     moe_capacity_factor=8 / 2)
  router_logits = hf_outputs(model, ids, output_router_logits=True).router_logits
  valid = (ids != -1).reshape(-1)
  experts = np.asarray(captured["router_experts"])
  weights = np.asarray(captured["router_weights"])
  assert experts.shape == (2, 2, 12, 2) and experts.dtype == np.int32
  for layer, logits in enumerate(router_logits):
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_e = torch.topk(probs, 2, dim=-1)
    ours_e = experts[layer].reshape(-1, 2)[valid]
    np.testing.assert_array_equal(ours_e, top_e.numpy()[valid])
    assert report(f"OLMoE router weights layer {layer}", weights[layer].reshape(-1, 2)[valid],
                  top_w.numpy()[valid]) <= TOL
    assert len(np.unique(ours_e)) >= 6   # a degenerate router would make the check vacuous


def test_vit_layers_match_clip_hidden_states(tmp_path):
  hf = hf_model("clip")
  directory = save(hf, tmp_path / "clip")
  cfg = hfc.vision_config_from_hf(hfc.read_hf_config(directory), drop_last_layer=False,
                                  selected_layers=(2, 0))
  params = hfc.convert_clip(directory, cfg)
  pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    hidden = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  run = jax.jit(lambda p, x: VisionTransformer(cfg).apply(
      {"params": p}, x, mutable=[capture.collection("vit")]))
  selected, state = run(params, jnp.asarray(clip_patches(pixels, 4)))
  captured = capture.collect(state, ("vit",))
  assert report("CLIP hidden_states[0]", np.asarray(captured["vit_embeddings"]),
                hidden[0].numpy()) <= TOL
  assert captured["vit_layers"].shape[0] == len(hidden) - 1 == 3
  for i in range(3):
    assert report(f"CLIP hidden_states[{i + 1}]", np.asarray(captured["vit_layers"][i]),
                  hidden[i + 1].numpy()) <= TOL
  np.testing.assert_array_equal(captured["vit_selected"], np.stack(selected))
  np.testing.assert_array_equal(captured["vit_selected"][0], captured["vit_layers"][2])


# --------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------

def tiny_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  v, pre = cfg.vision, cfg.preprocess
  n, t = 3, 40
  ids = rng.integers(0, 90, (2, t)).astype(np.int32)
  ids[1, 30:] = -1
  idx = np.full((2, n, pre.pooled_per_crop), -1, np.int32)
  idx[0, :2] = np.arange(2 * pre.pooled_per_crop).reshape(2, -1) % 30 + 1
  idx[1, :1] = np.arange(pre.pooled_per_crop) + 2
  images = rng.standard_normal((2, n, v.num_patches, v.patch_dim)).astype(np.float32)
  images[1, 1:] = -1
  masks = np.ones((2, n, v.num_patches), np.float32)
  return {"input_ids": ids, "images": images, "image_masks": masks, "image_input_idx": idx}


@pytest.mark.parametrize("family", ["qwen2", "olmoe"])
def test_full_model_capture_plumbing(family):
  cfg = C.tiny(family)
  model = Molmo(cfg)
  batch = {k: jnp.asarray(v) for k, v in tiny_batch(cfg).items()}
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  logits, out = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  assert "captured" not in out
  run = jax.jit(lambda p, b: model.apply({"params": p}, b, capture="all"))
  logits_c, out_c = run(params, batch)
  np.testing.assert_array_equal(logits, logits_c)        # capturing changes nothing
  got = out_c["captured"]
  expected = {n for g, names in capture.GROUPS.items() for n in names
              if g != "router" or cfg.llm.is_moe}
  assert set(got) == expected
  b, n, l = 2, 3, cfg.llm.num_layers
  assert got["decoder_layers"].shape == (l, b, 40, cfg.llm.d_model)
  assert got["vit_layers"].shape[:2] == (cfg.vision.num_layers, b * n)
  selected = np.asarray(got["vit_layers"])[list(cfg.vision.resolved_layers())]
  np.testing.assert_array_equal(got["vit_selected"], selected)
  features = model.apply({"params": params}, batch["images"], batch["image_masks"],
                         method=Molmo.encode_images)
  np.testing.assert_allclose(got["image_features"], features, rtol=1e-5, atol=1e-5)   # jit vs not
  assert got["image_pooled"].shape == (b * n, cfg.preprocess.pooled_per_crop, cfg.vision.width)
  # The last layer's output, final-normed, is out["hidden"].
  final = model.apply({"params": params}, got["decoder_layers"][-1],
                      method=lambda m, x: m.llm.final_norm(x))
  np.testing.assert_allclose(final, out["hidden"], atol=1e-5)
  if cfg.llm.is_moe:
    assert got["router_experts"].shape == (l, b, 40, cfg.llm.experts_per_token)
  only = model.apply({"params": params}, batch, capture=["decoder"])[1]["captured"]
  assert set(only) == {"decoder_embeddings", "decoder_layers"}
  with pytest.raises(ValueError, match="unknown group"):
    model.apply({"params": params}, batch, capture=["attention"])


def hlo_op_count(fn, *args) -> int:
  text = jax.jit(fn).lower(*args).compile().as_text()
  return sum(1 for line in text.splitlines() if " = " in line)


@pytest.mark.parametrize("family, remat", [("olmoe", "none"), ("qwen2", "full")])
def test_nothing_captured_costs_nothing(monkeypatch, family, remat):
  """The forward and its gradient compile to the same ops whether or not the capture points
  exist (capture.sow replaced by a no-op), and no parameter tree holds a capture collection."""
  cfg = C.tiny(family).replace(remat_policy=remat)
  model = Molmo(cfg)
  batch = {k: jnp.asarray(v) for k, v in tiny_batch(cfg).items()}
  variables = model.init(jax.random.PRNGKey(0), batch)
  assert set(variables) == {"params"}
  forward = lambda p, b: model.apply({"params": p}, b)[0]
  grad = jax.grad(lambda p, b: forward(p, b).sum())
  with_points = (hlo_op_count(forward, variables["params"], batch),
                 hlo_op_count(grad, variables["params"], batch))
  monkeypatch.setattr(capture, "sow", lambda *args: None)
  jax.clear_caches()
  without = (hlo_op_count(forward, variables["params"], batch),
             hlo_op_count(grad, variables["params"], batch))
  assert with_points == without
  monkeypatch.undo()
  captured = hlo_op_count(lambda p, b: model.apply({"params": p}, b, capture="all")[1]["captured"],
                          variables["params"], batch)
  assert captured > 0
