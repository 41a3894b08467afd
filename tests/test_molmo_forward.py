"""Forward-pass semantics of the full Molmo model (the reference's olmo/data/model_preprocessor.py (image_masks); olmo/data/collator.py; olmo/model.py (forward pass); olmo/data/model_preprocessor.py (several conversations per image)) on tiny configs.

Legend: B batch, T text length, N crops, P patches per crop, C patch values, Q pooled cells per
crop, S KV-cache length, V logits width.

Covers: absent crops, right padding, packed conversations (subsegments), the KV cache and bf16.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import model_helpers
import pytest

from molmo_jax import config as C
from molmo_jax.models.decoder import init_cache
from molmo_jax.models.molmo import Molmo

TOL = 1e-5
IMAGE_SEGMENT = 10000   # subsegment id of the shared image block (the reference's olmo/data/model_preprocessor.py (several conversations per image))


def random_params(model, batch, seed):
  """Random parameters of `model` at a scale where every term matters (see model_helpers)."""
  return model_helpers.random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"], seed)


def image_inputs(cfg, rng, batch, crops):
  p, c = cfg.vision.num_patches, cfg.vision.patch_dim
  return (rng.standard_normal((batch, crops, p, c)),
          rng.choice(np.array([0.0, 0.3, 1.0]), size=(batch, crops, p)))


def to_batch(**arrays):
  dtypes = {"images": jnp.float32, "image_masks": jnp.float32}
  return {k: jnp.asarray(v, dtypes.get(k, jnp.int32)) for k, v in arrays.items()}


@functools.lru_cache(maxsize=None)
def forward(cfg):
  model = Molmo(cfg)
  return jax.jit(lambda params, batch: model.apply({"params": params}, batch)[0])


# ----------------------------------------------------------------------------------------------
# (a)-(c) and bf16: one tiny qwen2 model, one compiled shape [2, 48] with 2 crops.
# ----------------------------------------------------------------------------------------------

T, CROPS = 48, 2


@pytest.fixture(scope="module")
def qwen2():
  cfg = C.tiny("qwen2")
  rng = np.random.default_rng(0)
  q = cfg.preprocess.pooled_per_crop
  images, masks = image_inputs(cfg, rng, 2, CROPS)
  ids = rng.integers(0, cfg.llm.vocab_size, (2, T))
  idx = np.tile(np.arange(1, 1 + CROPS * q).reshape(1, CROPS, q), (2, 1, 1))
  batch = to_batch(input_ids=ids, images=images, image_masks=masks, image_input_idx=idx)
  params = random_params(Molmo(cfg), batch, seed=1)
  return cfg, params, batch


def test_absent_crop_mask_values_do_not_matter(qwen2):
  cfg, params, batch = qwen2
  images = np.array(batch["images"])
  images[1, 1] = -1.0
  idx = np.array(batch["image_input_idx"])
  idx[1, 1] = -1                       # collator padding: the absent crop has no token positions
  idx[1, 1, ::3] = -100
  masks_a, masks_b = np.array(batch["image_masks"]), np.array(batch["image_masks"])
  masks_a[1, 1] = -1.0
  masks_b[1, 1] = np.random.default_rng(2).choice([0.0, 0.3, 1.0], size=masks_b.shape[-1])
  run = lambda masks: np.asarray(forward(cfg)(params, dict(
      batch, images=jnp.asarray(images), image_masks=jnp.asarray(masks), image_input_idx=jnp.asarray(idx))))
  a, b = run(masks_a), run(masks_b)
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  # The present crop's masks do matter (the pad embeddings are live).
  masks_c = masks_a.copy()
  masks_c[1, 0] = 1.0
  assert np.abs(run(masks_c) - a)[1].max() > 1e-3


def test_right_padding_does_not_change_valid_logits(qwen2):
  cfg, params, batch = qwen2
  valid = 41
  ids = np.array(batch["input_ids"])
  ids[1, valid:] = -1
  padded = np.asarray(forward(cfg)(params, dict(batch, input_ids=jnp.asarray(ids))))
  alone = {k: v[1:] for k, v in batch.items()}
  alone["input_ids"] = jnp.asarray(ids[1:, :valid])
  alone_logits = np.asarray(forward(cfg)(params, alone))
  np.testing.assert_allclose(padded[1, :valid], alone_logits[0], atol=TOL, rtol=0)
  assert np.abs(alone_logits).max() > 1.0          # logits at a scale where TOL is meaningful


def packed_batch(cfg, batch, conv1_ids, conv2_ids):
  """Row 0: [image block | conversation 1 | conversation 2]; row 1: [image block | conversation 2 | pad].

  Both rows hold row 0's image. The image block is BOS + the image tokens (segment 10000);
  conversations have ids 1 and 2.
  Positions follow the reference's olmo/data/model_preprocessor.py (several conversations per image): for segment s, cumsum(seg >= s) - 1.
  """
  ids = np.array(batch["input_ids"])
  block = 1 + CROPS * cfg.preprocess.pooled_per_crop
  n1, n2 = len(conv1_ids), len(conv2_ids)
  assert block + n1 + n2 == T
  ids[0, block:] = np.concatenate([conv1_ids, conv2_ids])
  ids[1, :block] = ids[0, :block]
  ids[1, block:block + n2] = conv2_ids
  ids[1, block + n2:] = -1
  segments = np.full((2, T), IMAGE_SEGMENT)
  segments[0, block:block + n1] = 1
  segments[0, block + n1:] = 2
  segments[1, block:] = 2
  positions = np.zeros((2, T), np.int64)
  for b in range(2):
    for s in np.unique(segments[b]):
      here = segments[b] == s
      positions[b, here] = (np.cumsum(segments[b] >= s) - 1)[here]
  positions[1, block + n2:] = 0
  images, masks = np.array(batch["images"]), np.array(batch["image_masks"])
  images[1], masks[1] = images[0], masks[0]               # both rows share the image block
  return dict(batch, input_ids=jnp.asarray(ids), images=jnp.asarray(images),
              image_masks=jnp.asarray(masks), subsegment_ids=jnp.asarray(segments, jnp.int32),
              position_ids=jnp.asarray(positions, jnp.int32)), block, n1, n2


def test_packed_conversations_are_independent(qwen2):
  cfg, params, batch = qwen2
  rng = np.random.default_rng(3)
  conv1 = rng.integers(0, cfg.llm.vocab_size, 7)
  conv2 = rng.integers(0, cfg.llm.vocab_size, 8)
  packed, block, n1, n2 = packed_batch(cfg, batch, conv1, conv2)
  logits = np.asarray(forward(cfg)(params, packed))
  conv2_packed = logits[0, block + n1:]
  # Conversation 2 sees the image and itself only: it equals conversation 2 run without conversation 1.
  np.testing.assert_allclose(conv2_packed, logits[1, block:block + n2], atol=TOL, rtol=0)

  other, *_ = packed_batch(cfg, batch, (conv1 + 5) % cfg.llm.vocab_size, conv2)
  perturbed = np.asarray(forward(cfg)(params, other))
  np.testing.assert_allclose(perturbed[0, block + n1:], conv2_packed, atol=1e-6, rtol=0)
  assert np.abs(perturbed[0, block:block + n1] - logits[0, block:block + n1]).max() > 1e-2

  images = np.array(packed["images"])
  images[0, 0] *= -0.5
  new_image = np.asarray(forward(cfg)(params, dict(packed, images=jnp.asarray(images, jnp.float32))))
  assert np.abs(new_image[0, block + n1:] - conv2_packed).max() > 1e-2


def test_bfloat16_forward_close_to_float32(qwen2):
  cfg, params, batch = qwen2
  fp32 = np.asarray(forward(cfg)(params, batch))
  bf16 = np.asarray(forward(cfg.replace(dtype="bfloat16"))(params, batch))
  assert bf16.dtype == np.float32 and np.all(np.isfinite(bf16))
  scale, spread = np.abs(fp32).max(), fp32.std()
  diff = np.abs(bf16 - fp32)
  agreement = np.mean(bf16.argmax(-1) == fp32.argmax(-1))
  # Measured over 3 seeds of this set-up: |logits| max ~5, std ~1.2; max diff 0.12-0.18 (<4% of the
  # max), mean diff ~0.018 (1.5% of the std), argmax agreement 0.94-0.99. The bounds leave a ~2.5x
  # margin (the params stay float32; only the compute dtype changes).
  assert diff.max() < 0.1 * scale, (diff.max(), scale)
  assert diff.mean() < 0.04 * spread, (diff.mean(), spread)
  assert agreement > 0.85, agreement
  assert diff.max() > 1e-3                         # the bf16 path really ran in bf16


# ----------------------------------------------------------------------------------------------
# (d) KV cache: prefill + single-token decode == full forward, for each LLM family.
# ----------------------------------------------------------------------------------------------

def cache_mask(query_slots, filled, length):
  """[B, T, S]: key slot written (slot < filled) and slot <= query slot."""
  slots = np.arange(length)
  mask = (slots[None, None, :] <= query_slots[:, :, None]) & (slots < filled)[None, None, :]
  return jnp.asarray(mask)


@pytest.mark.parametrize("family", ["qwen2", "olmo", "olmoe"])
def test_kv_cache_decode_matches_full_forward(family):
  cfg = C.tiny(family)
  b, t, prefill, cache_len = 2, 24, 20, 32
  rng = np.random.default_rng(4)
  q = cfg.preprocess.pooled_per_crop
  images, masks = image_inputs(cfg, rng, b, 1)
  ids = rng.integers(0, cfg.llm.vocab_size, (b, t))
  idx = np.tile(np.arange(1, 1 + q).reshape(1, 1, q), (b, 1, 1))
  full_batch = to_batch(input_ids=ids, images=images, image_masks=masks, image_input_idx=idx)
  model = Molmo(cfg)
  params = random_params(model, full_batch, seed=5)
  # The vision tower runs once; full forward and prefill both take its features.
  features = jax.jit(functools.partial(model.apply, method=Molmo.encode_images))(
      {"params": params}, full_batch["images"], full_batch["image_masks"])
  full = np.asarray(jax.jit(lambda p, bt, f: model.apply({"params": p}, bt, image_features=f)[0])(
      params, full_batch, features))

  @jax.jit
  def step(params, batch, cache, index, mask, features=None):
    return model.apply({"params": params}, batch, cache=cache, cache_index=index, attention_mask=mask,
                       image_features=features)

  slots = np.tile(np.arange(prefill), (b, 1))
  first = {"input_ids": full_batch["input_ids"][:, :prefill], "position_ids": jnp.asarray(slots, jnp.int32),
           "image_input_idx": full_batch["image_input_idx"]}
  logits, out = step(params, first, init_cache(cfg.llm, b, cache_len), jnp.int32(0),
                     cache_mask(slots, prefill, cache_len), features)
  got = [np.asarray(logits)]
  cache = out["cache"]
  for i in range(prefill, t):
    pos = np.full((b, 1), i)
    token = {"input_ids": full_batch["input_ids"][:, i:i + 1], "position_ids": jnp.asarray(pos, jnp.int32)}
    logits, out = step(params, token, cache, jnp.int32(i), cache_mask(pos, i + 1, cache_len))
    cache = out["cache"]
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  np.testing.assert_allclose(got, full, atol=TOL, rtol=0)
  assert np.abs(full).max() > 1.0


def test_sincos2d_position_init_encodes_row_and_column():
  """The from-scratch position table: CLS row zero, each patch a distinct unit-amplitude code whose
  x-quarter depends only on the column and y-quarter only on the row."""
  from molmo_jax.models.vit import VisionTransformer
  vision = C.VisionConfig(image_size=32, patch_size=8, width=16, num_heads=2, head_dim=8, num_layers=1,
                          mlp_dim=32, selected_layers=(0,), position_init="sincos2d")
  params = VisionTransformer(vision).init(jax.random.key(0), jnp.zeros((1, 16, 192)))["params"]
  table = np.asarray(nn.unbox(params["positional_embedding"]))
  assert table.shape == (17, 16)
  np.testing.assert_array_equal(table[0], 0.0)
  grid = table[1:].reshape(4, 4, 16)                    # [row, col, D]
  np.testing.assert_allclose(grid[:, :, :8], np.broadcast_to(grid[:1, :, :8], grid[:, :, :8].shape))
  np.testing.assert_allclose(grid[:, :, 8:], np.broadcast_to(grid[:, :1, 8:], grid[:, :, 8:].shape))
  distances = np.linalg.norm(table[1:, None] - table[None, 1:], axis=-1)
  assert distances[~np.eye(16, dtype=bool)].min() > 0.1
  # column 1: sin(1 * w) at w = 10000^(-k/4), k = 0..3
  np.testing.assert_allclose(grid[0, 1, :4], np.sin([1.0, 1e-1, 1e-2, 1e-3]), rtol=1e-5)
  with pytest.raises(ValueError, match="divisible by 4"):
    VisionTransformer(C.VisionConfig(**{**vision.__dict__, "width": 18, "head_dim": 9})).init(
        jax.random.key(0), jnp.zeros((1, 16, 192)))


def test_unrolled_layer_scans_give_the_same_logits_and_gradients(qwen2):
  # scan_unroll changes the compiled loop only: same parameter tree, same numbers.
  cfg, params, batch = qwen2
  unrolled = cfg.replace(scan_unroll=cfg.llm.num_layers + 5)
  shapes = lambda c: jax.tree.map(jnp.shape, jax.eval_shape(Molmo(c).init, jax.random.PRNGKey(0), batch))
  assert shapes(unrolled) == shapes(cfg)

  def loss_and_grads(c):
    model = Molmo(c)
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, batch)[0]))
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(cfg), loss_and_grads(unrolled)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="scan_unroll"):
    Molmo(cfg.replace(scan_unroll=0)).init(jax.random.PRNGKey(0), batch)


def test_host_gemm_gradients_give_the_same_logits_and_gradients(qwen2):
  # layers.host_gemm_gradients changes how the kernel gradients are computed (a GEMM on a
  # transposed copy of the input), not what they are: full model, every parameter.
  from molmo_jax.models import layers
  cfg, params, batch = qwen2
  model = Molmo(cfg)

  def loss_and_grads(host):
    def loss(p):
      with layers.host_gemm_gradients(host):
        return jnp.mean(jnp.square(model.apply({"params": p}, batch)[0]))
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads_b))


@pytest.mark.parametrize("heads,kv_heads,masked", [(4, 4, False), (4, 2, True), (6, 1, True)])
def test_attention_equals_softmax_attention(heads, kv_heads, masked):
  # dot_product_attention normalises after the value product; the function (values and
  # gradients), including rows whose every key is masked (uniform weights), is softmax(qk/sqrt(h))v.
  from molmo_jax.models.layers import dot_product_attention
  b, t, s, h = 2, 5, 7, 8
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in ((b, t, heads, h), (b, s, kv_heads, h), (b, s, kv_heads, h)))
  mask = None
  if masked:
    mask = jnp.asarray(rng.random((b, t, s)) < 0.6).at[0, 1].set(False)   # one fully masked row

  def reference(q, k, v):
    kk, vv = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(h)
    if mask is not None:
      scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vv)

  ours = functools.partial(dot_product_attention, mask=mask)
  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
  cotangent = jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
           for f in (ours, reference)]
  for a, r in zip(*grads):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
