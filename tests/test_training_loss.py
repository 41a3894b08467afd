"""Loss: weighted token CE, z-loss, ignore index, global normalisation (the reference's olmo/train.py (loss))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax.training import loss as loss_lib


def _batch(seed=0, b=3, t=6, v=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  targets[0, :2] = -1
  targets[-1, 5] = -100
  weights = rng.uniform(0.2, 2.0, (b, t)).astype(np.float32)
  weights[-1, 3] = 0.0
  return logits, targets, weights


def _numpy_reference(logits, targets, weights, z_weight=0.0):
  logits = logits.astype(np.float64)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  valid = targets >= 0
  w = np.where(valid, weights, 0.0)
  target_logit = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  ce = (lse - target_logit) * w
  return ce.sum() / w.sum(), z_weight * (lse ** 2 * w).sum() / w.sum(), w.sum()


def test_cross_entropy_matches_numpy_reference():
  logits, targets, weights = _batch()
  loss, metrics = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                               jnp.asarray(weights))
  ref_ce, _, ref_wsum = _numpy_reference(logits, targets, weights)
  np.testing.assert_allclose(loss, ref_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce_loss"], ref_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["weight_sum"], ref_wsum, rtol=1e-6)
  assert metrics["token_count"] == np.sum((targets >= 0) & (weights != 0))
  assert metrics["z_loss"] == 0.0


def test_z_loss_value_is_weighted_and_normalised_like_ce():
  logits, targets, weights = _batch(seed=1)
  loss, metrics = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                               jnp.asarray(weights), z_loss_weight=1e-4)
  ref_ce, ref_z, _ = _numpy_reference(logits, targets, weights, z_weight=1e-4)
  np.testing.assert_allclose(metrics["z_loss"], ref_z, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_ce + ref_z, rtol=1e-5)
  assert ref_z > 1e-4  # logits of scale 3 make the z-loss visible at this weight


def test_weights_are_a_weighted_mean_not_a_mask():
  logits, targets, weights = _batch(seed=2, b=1)
  targets = np.random.default_rng(9).integers(0, logits.shape[-1], targets.shape).astype(np.int32)
  ones = np.ones_like(weights)
  base, _ = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(ones))
  # Scaling every weight leaves the mean unchanged (the normaliser is Σw, not the token count) ...
  scaled, m = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                           jnp.asarray(ones * 0.25))
  np.testing.assert_allclose(scaled, base, rtol=1e-6)
  np.testing.assert_allclose(m["weight_sum"], 0.25 * ones.size)
  # ... and weight 2 on a token equals that token appearing twice.
  double = ones.copy()
  double[0, 4] = 2.0
  weighted, _ = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                             jnp.asarray(double))
  dup_logits = np.concatenate([logits, logits[:, 4:5]], axis=1)
  dup_targets = np.concatenate([targets, targets[:, 4:5]], axis=1)
  duplicated, _ = loss_lib.token_cross_entropy(jnp.asarray(dup_logits), jnp.asarray(dup_targets),
                                               jnp.ones(dup_targets.shape))
  np.testing.assert_allclose(weighted, duplicated, rtol=1e-6)
  assert abs(float(weighted) - float(base)) > 1e-4


def test_ignored_targets_never_index_and_get_no_gradient():
  logits, targets, weights = _batch(seed=3)
  targets[1, 0] = 11        # == V: out of range, also ignored but counted
  weights[:] = 1.0          # ignored positions carry weight: the target alone must exclude them

  def f(lg):
    return loss_lib.token_cross_entropy(lg, jnp.asarray(targets), jnp.asarray(weights))

  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
  ignored = (targets < 0) | (targets >= 11)
  assert ignored.sum() == 4
  np.testing.assert_array_equal(np.asarray(grads)[ignored], 0.0)
  assert np.all(np.abs(np.asarray(grads)[~ignored]).sum(-1) > 0)
  keep = np.where(ignored, -1, targets)
  ref, _, _ = _numpy_reference(logits, keep, weights)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert metrics["out_of_range_count"] == 1
  assert metrics["token_count"] == targets.size - 4


def test_accuracy_counts_argmax_hits_among_loss_tokens():
  logits = np.zeros((1, 4, 5), np.float32)
  logits[0, np.arange(4), [1, 2, 3, 4]] = 5.0
  targets = np.array([[1, 2, 0, -1]], np.int32)  # two hits, one miss, one ignored
  _, metrics = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                            jnp.ones((1, 4)))
  np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)


def test_no_loss_tokens_gives_zero_not_nan():
  logits, targets, _ = _batch(seed=4)
  loss, metrics = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                               jnp.zeros(targets.shape), z_loss_weight=1e-4)
  grads = jax.grad(lambda lg: loss_lib.token_cross_entropy(
      lg, jnp.asarray(targets), jnp.zeros(targets.shape))[0])(jnp.asarray(logits))
  assert float(loss) == 0.0 and float(metrics["accuracy"]) == 0.0
  assert np.all(np.isfinite(np.asarray(grads)))


def test_bf16_logits_are_promoted_to_fp32():
  logits, targets, weights = _batch(seed=5)
  low = jnp.asarray(logits, jnp.bfloat16)
  loss, _ = loss_lib.token_cross_entropy(low, jnp.asarray(targets), jnp.asarray(weights))
  ref, _, _ = _numpy_reference(np.asarray(low.astype(jnp.float32)), targets, weights)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_micro_batches_with_global_normaliser_match_the_full_batch():
  logits, targets, weights = _batch(seed=6, b=4)
  logits, targets, weights = map(jnp.asarray, (logits, targets, weights))

  def full(lg):
    return loss_lib.token_cross_entropy(lg, targets, weights, z_loss_weight=1e-4)[0]

  full_loss, full_grad = jax.value_and_grad(full)(logits)
  _, full_metrics = loss_lib.token_cross_entropy(logits, targets, weights, z_loss_weight=1e-4)

  normaliser = loss_lib.loss_weight_sum(targets, weights, logits.shape[-1])
  grads, sums, loss_total = [], [], 0.0
  for part in (slice(0, 1), slice(1, 4)):   # unequal micro-batches: a per-part mean would differ
    def piece(lg, part=part):
      return loss_lib.token_cross_entropy(lg, targets[part], weights[part], 1e-4, normaliser)[0]
    value, grad = jax.value_and_grad(piece)(logits[part])
    loss_total += value
    grads.append(grad)
    sums.append(loss_lib.loss_sums(logits[part], targets[part], weights[part], 1e-4))
  np.testing.assert_allclose(loss_total, full_loss, rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(grads), full_grad, rtol=1e-5, atol=1e-9)
  summed = jax.tree.map(lambda *xs: sum(xs), *sums)
  _, metrics = loss_lib.loss_from_sums(summed)
  for key in ("loss", "ce_loss", "z_loss", "weight_sum", "accuracy", "token_count"):
    np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-6)
  # The naive alternative (mean of per-micro-batch means) is measurably different here.
  naive = np.mean([loss_lib.loss_from_sums(s)[0] for s in sums])
  assert abs(naive - float(full_loss)) > 1e-3


def test_bad_shapes_name_the_input():
  logits = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="targets"):
    loss_lib.token_cross_entropy(logits, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="weights"):
    loss_lib.token_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="integer"):
    loss_lib.token_cross_entropy(logits, jnp.zeros((2, 3)), jnp.ones((2, 3)))


def test_accuracy_equals_argmax_accuracy_on_random_logits():
  # The cheap form ("target logit reaches the row max") counts what argmax == target counts.
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((3, 50, 17)).astype(np.float32)
  targets = np.where(rng.random((3, 50)) < 0.35, logits.argmax(-1), rng.integers(0, 17, (3, 50)))
  targets[0, :5] = -1
  weights = rng.random((3, 50)).astype(np.float32)
  _, metrics = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets, jnp.int32),
                                            jnp.asarray(weights))
  counted = targets >= 0
  expected = (logits.argmax(-1) == targets)[counted].mean()
  assert 0.2 < expected < 0.8
  np.testing.assert_allclose(metrics["accuracy"], expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Chunked LM head + loss
# ----------------------------------------------------------------------------------------------

def _hidden_batch(seed=0, b=2, t=37, d=16, v=29):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(0, 1, (b, t, d)).astype(np.float32)
  head = rng.normal(0, 0.7, (d, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  targets[0, :3] = -1
  targets[1, 7] = v + 4                                   # out of range: ignored and counted
  weights = rng.uniform(0.2, 2.0, (b, t)).astype(np.float32)
  weights[1, 10] = 0.0
  return jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(weights)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
  hidden, head, targets, weights = _hidden_batch()

  def plain(hidden, head):
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    sums = loss_lib.loss_sums(logits, targets, weights, z_loss_weight=1e-2)
    return loss_lib.loss_from_sums(sums)[0], sums

  def chunked(hidden, head):
    sums = loss_lib.chunked_loss_sums(hidden, head, targets, weights, 1e-2, chunk_size=chunk)
    return loss_lib.loss_from_sums(sums)[0], sums

  (loss_p, sums_p), grads_p = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(hidden, head)
  (loss_c, sums_c), grads_c = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, head)
  np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-6)
  for key in loss_lib.SUM_KEYS:
    np.testing.assert_allclose(float(sums_c[key]), float(sums_p[key]), rtol=1e-6, err_msg=key)
  assert float(sums_p["out_of_range_count"]) == 1 and float(sums_p["z_sum"]) > 0
  for got, want in zip(grads_c, grads_p):
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_chunked_loss_never_holds_the_full_logits():
  """Neither the forward nor the backward program has a [B, T, V] (or [B*T, V]) array."""
  b, t, d, v = 2, 48, 16, 53
  hidden, head, targets, weights = _hidden_batch(b=b, t=t, d=d, v=v)
  grad = lambda fn: jax.jit(jax.grad(lambda h, w: loss_lib.loss_from_sums(fn(h, w))[0], (0, 1)))

  def plain(h, w):
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    return loss_lib.loss_sums(logits, targets, weights)

  chunked = lambda h, w: loss_lib.chunked_loss_sums(h, w, targets, weights, chunk_size=16)
  hlo = lambda fn: grad(fn).lower(hidden, head).as_text()        # StableHLO: tensor<2x48x53xf32>
  assert f"{b}x{t}x{v}" in hlo(plain)                       # the check sees full logits
  text = hlo(chunked)
  assert f"{b}x{t}x{v}" not in text and f"{b * t}x{v}" not in text
  assert f"{b}x16x{v}" in text                            # one chunk's logits


def test_chunked_loss_rejects_bad_shapes():
  hidden, head, targets, weights = _hidden_batch()
  with pytest.raises(ValueError, match="lm_head"):
    loss_lib.chunked_loss_sums(hidden, head.T, targets, weights)
  with pytest.raises(ValueError, match="targets"):
    loss_lib.chunked_loss_sums(hidden, head, targets[:, 1:], weights)
  with pytest.raises(ValueError, match="chunk_size"):
    loss_lib.chunked_loss_sums(hidden, head, targets, weights, chunk_size=0)


@pytest.mark.parametrize("chunk", [8, 37])
def test_chunked_loss_with_an_int8_head_equals_the_plain_loss(chunk):
  """A weight-only int8 head (qwix values q, per-vocabulary-row scales s: an int8 LoRA base): the
  chunked loss equals the loss of the dequantized head's logits, gradients to hidden too."""
  import qwix
  hidden, head, targets, weights = _hidden_batch()
  quantized = qwix.quantize(head, jnp.int8, channelwise_axes=(1,))          # scale [1, V]
  q, scale = quantized.qvalue, quantized.scale
  assert q.dtype == jnp.int8 and scale.shape == (1, head.shape[1])

  def plain(hidden):
    logits = jnp.einsum("btd,dv->btv", hidden, qwix.dequantize(quantized),
                        preferred_element_type=jnp.float32)
    return loss_lib.loss_from_sums(loss_lib.loss_sums(logits, targets, weights, 1e-2))[0]

  def chunked(hidden):
    sums = loss_lib.chunked_loss_sums(hidden, q, targets, weights, 1e-2, chunk_size=chunk,
                                      head_scale=scale)
    return loss_lib.loss_from_sums(sums)[0]

  loss_p, grad_p = jax.jit(jax.value_and_grad(plain))(hidden)
  loss_c, grad_c = jax.jit(jax.value_and_grad(chunked))(hidden)
  np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-6)
  assert float(jnp.abs(grad_p).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(grad_c), np.asarray(grad_p), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="head_scale"):
    loss_lib.chunked_loss_sums(hidden, q, targets, weights, head_scale=scale[0])
