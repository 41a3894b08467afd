"""Connector and image-feature insertion against an independent NumPy reading of the reference's olmo/data/model_preprocessor.py (image_masks); olmo/data/model_preprocessor.py (image_input_idx); olmo/model.py (vision backbone: pooling and projector).

Legend: B crops (or batch rows), K selected ViT layers, S = P + 1 tokens per crop (CLS first),
P = g*g patches, C = K*Dv concatenated width, Q pooled cells, W = 4 patches per window,
Hp pooling heads, hp pooling head dim, D LLM width, T text length, N crops per example.

The reference side below is written from the spec only; it never calls the model's helpers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax.models.connector import Connector
from molmo_jax.models.decoder import Decoder
from molmo_jax.models.molmo import Molmo, insert_image_features
from molmo_jax.models.vit import VisionTransformer

TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Random parameters that make every term visible (zero biases and pad embeddings would hide bugs).
# ----------------------------------------------------------------------------------------------

from model_helpers import random_params  # noqa: E402


def tiny_batch(cfg, rng, batch=2, crops=2, length=48):
  """A Molmo batch: crop 1 of row 1 absent (all -1), -1 text padding, -1/-100 image indices."""
  p, c, q = cfg.vision.num_patches, cfg.vision.patch_dim, cfg.preprocess.pooled_per_crop
  ids = rng.integers(0, cfg.llm.vocab_size, (batch, length))
  ids[1, length - 5:] = -1
  images = rng.standard_normal((batch, crops, p, c))
  images[1, 1] = -1.0
  masks = rng.choice(np.array([0.0, 0.3, 1.0, -1.0]), size=(batch, crops, p))
  # Distinct positions per row, inside the valid text.
  idx = np.stack([rng.permutation(np.arange(1, length - 6))[: crops * q].reshape(crops, q)
                  for _ in range(batch)])
  idx[:, 0, :3] = -100                     # discarded cells of a crop
  idx[1, 1] = -1                           # the absent crop: collator padding
  return {"input_ids": jnp.asarray(ids, jnp.int32), "images": jnp.asarray(images, jnp.float32),
          "image_masks": jnp.asarray(masks, jnp.float32),
          "image_input_idx": jnp.asarray(idx, jnp.int32)}


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64), from the spec text.
# ----------------------------------------------------------------------------------------------

def np_silu(x):
  return x / (1.0 + np.exp(-x))


def reference_connector(layers, masks, present, params, grid):
  """layers: K x [B, S, Dv]; masks [B, P]; present [B] -> [B, Q, D]."""
  f = np.concatenate([np.asarray(l, np.float64) for l in layers], axis=-1)[:, 1:]   # drop CLS
  f = f * np.asarray(present, np.float64)[:, None, None]
  pad = np.asarray(params["pad_embed"], np.float64)
  masks = np.asarray(masks, np.float64)
  for b in range(f.shape[0]):
    for i in range(f.shape[1]):
      m = masks[b, i]
      if m == 0:
        f[b, i] += pad[0]
      elif m < 1:                          # partial padding, and -1
        f[b, i] += pad[1]

  windows = []                             # [B, Q, 4, C], windows row-major
  for r in range(grid // 2):
    for c in range(grid // 2):
      cells = [(2 * r, 2 * c), (2 * r, 2 * c + 1), (2 * r + 1, 2 * c), (2 * r + 1, 2 * c + 1)]
      windows.append(np.stack([f[:, y * grid + x] for y, x in cells], axis=1))
  windows = np.stack(windows, axis=1)

  pool = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params["pooling"].items()}
  heads, head_dim = pool["query"]["bias"].shape
  flat = lambda w: w.reshape(w.shape[0], heads * head_dim)
  query_in = windows.mean(axis=2)                                          # [B, Q, C]
  q = query_in @ flat(pool["query"]["kernel"]) + pool["query"]["bias"].reshape(-1)
  k = windows @ flat(pool["key"]["kernel"]) + pool["key"]["bias"].reshape(-1)
  v = windows @ flat(pool["value"]["kernel"]) + pool["value"]["bias"].reshape(-1)
  outs = []
  for h in range(heads):
    sl = slice(h * head_dim, (h + 1) * head_dim)
    scores = np.einsum("bqd,bqwd->bqw", q[..., sl], k[..., sl]) / np.sqrt(head_dim)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    outs.append(np.einsum("bqw,bqwd->bqd", probs, v[..., sl]))
  merged = np.concatenate(outs, axis=-1)
  out_kernel = pool["out"]["kernel"].reshape(heads * head_dim, -1)
  pooled = merged @ out_kernel + pool["out"]["bias"]

  proj = {k: np.asarray(d["kernel"], np.float64) for k, d in params["projector"].items()}
  return (np_silu(pooled @ proj["gate"]) * (pooled @ proj["up"])) @ proj["down"]


def reference_insert(x, features, idx):
  """x [B, T, D] + features [B, F, D] at idx [B, F] >= 0, one by one."""
  x = np.array(x, np.float64)
  for b in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      if idx[b, j] >= 0:
        x[b, idx[b, j]] += features[b, j]
  return x


def reference_embeddings(batch, llm_params, features):
  table = np.concatenate([llm_params["embedding"]["pretrained"], llm_params["embedding"]["new"]], 0)
  ids = np.asarray(batch["input_ids"])
  x = table.astype(np.float64)[np.where(ids != -1, ids, 0)]
  idx = np.asarray(batch["image_input_idx"]).reshape(ids.shape[0], -1)
  return reference_insert(x, features.reshape(ids.shape[0], idx.shape[1], -1), idx)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2():
  cfg = C.tiny("qwen2")
  batch = tiny_batch(cfg, np.random.default_rng(0))
  abstract = jax.eval_shape(Molmo(cfg).init, jax.random.PRNGKey(0), batch)
  return cfg, batch, random_params(abstract["params"], seed=1)


def test_connector_matches_numpy_reference(qwen2):
  cfg, _, params = qwen2
  rng = np.random.default_rng(2)
  crops, s, dv = 5, cfg.vision.num_positions, cfg.vision.width
  layers = tuple(jnp.asarray(rng.standard_normal((crops, s, dv)), jnp.float32)
                 for _ in cfg.vision.selected_layers)
  masks = rng.choice(np.array([0.0, 0.3, 1.0, -1.0]), size=(crops, cfg.vision.num_patches))
  masks[3] = -1.0                                               # the released off-by-one last crop
  images = rng.standard_normal((crops, cfg.vision.num_patches, cfg.vision.patch_dim))
  images[[1, 4]] = -1.0                                         # absent crops
  present = np.any(images != -1, axis=(1, 2))
  assert present.tolist() == [True, False, True, True, False]

  connector = Connector(cfg.vision, cfg.connector, cfg.llm.d_model)
  got = jax.jit(connector.apply)({"params": params["connector"]}, layers, jnp.asarray(masks, jnp.float32),
                                 jnp.asarray(present))
  want = reference_connector(layers, masks, present, params["connector"], cfg.vision.grid_size)
  assert got.shape == (crops, cfg.preprocess.pooled_per_crop, cfg.llm.d_model)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
  # The pad embeddings are live: changing which patches count as fully padded changes the output.
  assert np.abs(want).max() > 0.1
  swapped = reference_connector(layers, np.where(masks == 0, 1.0, masks), present,
                                params["connector"], cfg.vision.grid_size)
  assert np.abs(swapped - want).max() > 1e-2


def test_window_order_is_row_major_2x2(qwen2):
  """A feature planted in patch (y, x) reaches only pooled cell (y // 2, x // 2)."""
  cfg, _, params = qwen2
  g = cfg.vision.grid_size
  connector_params = dict(params["connector"], pad_embed=jnp.zeros_like(params["connector"]["pad_embed"]))
  base = [jnp.zeros((1, g * g + 1, cfg.vision.width)) for _ in cfg.vision.selected_layers]
  apply = jax.jit(lambda layers: Connector(cfg.vision, cfg.connector, cfg.llm.d_model).apply(
      {"params": connector_params}, tuple(layers), jnp.ones((1, g * g)), jnp.ones((1,), bool)))
  empty = np.asarray(apply(base))
  y, x = 3, 6
  planted = [base[0].at[0, 1 + y * g + x].set(3.0)] + base[1:]
  changed = np.abs(np.asarray(apply(planted)) - empty).max(axis=-1)[0]
  assert np.flatnonzero(changed > 1e-6).tolist() == [(y // 2) * (g // 2) + x // 2]


def test_insert_image_features_matches_loop():
  rng = np.random.default_rng(3)
  b, t, d, f = 3, 20, 8, 12
  x = rng.standard_normal((b, t, d))
  features = rng.standard_normal((b, f, d))
  idx = np.stack([rng.permutation(t)[:f] for _ in range(b)])
  idx[0, :4] = -100
  idx[1, 5:] = -1
  idx[2, 0] = -1
  got = insert_image_features(jnp.asarray(x, jnp.float32), jnp.asarray(features, jnp.float32),
                              jnp.asarray(idx, jnp.int32))
  want = reference_insert(x, features, idx)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
  # The negative slots really were skipped: the last token of row 1 is untouched unless targeted.
  untouched = np.setdiff1d(np.arange(t), idx[1][idx[1] >= 0])
  np.testing.assert_array_equal(np.asarray(got)[1, untouched], x[1, untouched].astype(np.float32))


# olmo is left out: its embedding stage has exactly the shapes of qwen2's.
@pytest.mark.parametrize("family", ["qwen2", "olmoe"])
def test_embed_inputs_matches_numpy(family):
  cfg = C.tiny(family)
  batch = tiny_batch(cfg, np.random.default_rng(4))
  model = Molmo(cfg)
  params = random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"], seed=5)

  got = jax.jit(lambda p, bt: model.apply({"params": p}, bt, method=Molmo.embed_inputs))(params, batch)
  b, n, p, c = batch["images"].shape
  layers = jax.jit(VisionTransformer(cfg.vision).apply)({"params": params["vision"]},
                                                        batch["images"].reshape(b * n, p, c))
  present = np.any(np.asarray(batch["images"]).reshape(b * n, -1) != -1, axis=1)
  features = reference_connector(layers, np.asarray(batch["image_masks"]).reshape(b * n, p), present,
                                 params["connector"], cfg.vision.grid_size)
  want = reference_embeddings(batch, params["llm"], features)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)

  if family == "qwen2":
    # The full forward is the decoder applied to exactly these embeddings.
    logits, _ = jax.jit(model.apply)({"params": params}, batch)
    ids = np.asarray(batch["input_ids"])
    valid = ids != -1
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    causal = np.tril(np.ones((ids.shape[1],) * 2, bool))[None] & valid[:, None, :]
    want_logits, _ = jax.jit(Decoder(cfg.llm).apply)(
        {"params": params["llm"]}, jnp.asarray(want, jnp.float32), jnp.asarray(positions),
        jnp.asarray(causal))
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(want_logits)[valid],
                               atol=TOL, rtol=0)
