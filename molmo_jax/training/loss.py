"""Token-level cross-entropy with loss weights and z-loss (the reference's olmo/train.py (loss), pitfall 30).

Shape legend:
  B  batch (examples)
  T  sequence length (tokens)
  V  output vocabulary (rows of the LM head; the image special tokens are not in it)

Loss masks are weights, not 0/1 flags: assistant answer tokens carry `w` (sqrt(1/n) for n packed
conversations, ChartQA human/augmented weights), everything else 0. The loss is the weighted mean
Σ(CE·w) / Σw over the GLOBAL batch. Under `jax.jit` with a sharded batch a plain `jnp.sum` is
already global; with gradient accumulation over micro-batches it is not, so:

  normaliser = loss_weight_sum(targets, weights, V)         # whole batch, before the model runs
  for each micro-batch:
    loss_i, sums_i = token_cross_entropy(..., normaliser=normaliser)   # grads of loss_i add up
  metrics = loss_from_sums(sum of sums_i)[1]

The z-loss (`z_loss_weight · logsumexp(logits)²` per loss token) is weighted and normalised the
same way and added to the loss.

`chunked_loss_sums(hidden, lm_head, ...)` returns the same sums without ever holding the
[B, T, V] fp32 logits: it runs the LM head and the loss over chunks of c sequence positions
(extra legend: D width, c chunk length), [B, c, V] at a time, and its custom backward pass
recomputes each chunk's logits instead of storing them, accumulating the LM-head gradient in
fp32. A weight-only int8 head (a LoRA run's int8 base, molmo_jax/lora.py) runs as int8 values
times per-vocabulary-row scales and gets no gradient.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Keys of the dict `loss_sums` returns. All are sums over tokens, so micro-batch and per-device
# results combine by addition (tree-add them, or `jax.lax.psum` them inside shard_map).
SUM_KEYS = ("ce_sum", "z_sum", "weight_sum", "token_count", "correct_count", "out_of_range_count")


def _check_targets(targets: jax.Array, weights: jax.Array, batch_shape: tuple, source: str) -> None:
  """targets [B, T] integer and weights [B, T], where [B, T] = batch_shape comes from `source`."""
  if targets.shape != batch_shape:
    raise ValueError(f"targets: expected shape {batch_shape} (the [B, T] of {source}), "
                     f"got {targets.shape}")
  if weights.shape != targets.shape:
    raise ValueError(f"weights: expected the shape of targets {targets.shape}, got {weights.shape}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")


def _check_shapes(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> None:
  if logits.ndim != 3:
    raise ValueError(f"logits: expected [B, T, V], got shape {logits.shape}")
  _check_targets(targets, weights, logits.shape[:2], "logits")


def _effective_weights(targets: jax.Array, weights: jax.Array, vocab_size: int) -> jax.Array:
  """[B, T] fp32 weights with every token whose target is not in [0, V) set to 0."""
  in_range = (targets >= 0) & (targets < vocab_size)
  return jnp.where(in_range, weights.astype(jnp.float32), 0.0)


def loss_weight_sum(targets: jax.Array, weights: jax.Array, vocab_size: int) -> jax.Array:
  """Σw over tokens that count: the normaliser of a whole (global) batch, needing no logits."""
  if weights.shape != targets.shape:
    raise ValueError(f"weights: expected the shape of targets {targets.shape}, got {weights.shape}")
  return jnp.sum(_effective_weights(targets, weights, vocab_size))


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
              z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
  """Un-normalised loss terms of one (micro-)batch, all fp32 scalars.

  Args:
    logits: [B, T, V] in any float dtype; promoted to fp32 here (the reference computes CE on fp32
      logits inside bf16 autocast).
    targets: [B, T] int; negative = ignore. A target >= V is ignored too (such an id cannot be
      predicted, so it is a pre-processing bug) and counted in `out_of_range_count`.
    weights: [B, T] float loss weights; only tokens with a target in [0, V) contribute.
    z_loss_weight: scale of the z-loss (the reference uses 1e-4 when enabled; 0 disables it).

  Returns:
    ce_sum = Σ CE·w; z_sum = z_loss_weight · Σ lse²·w; weight_sum = Σw; token_count = tokens
    with a valid target and w != 0; correct_count = how many of those have the target's logit at
    the row maximum (the argmax, counting exact ties as right);
    out_of_range_count = tokens with w != 0 whose target is >= V.
  """
  _check_shapes(logits, targets, weights)
  return _sums_from_logits(logits, targets, weights, z_loss_weight)


def _sums_from_logits(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                      z_loss_weight: float) -> dict[str, jax.Array]:
  """`loss_sums` without the shape checks; logits [..., V], targets/weights [...]."""
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  effective = _effective_weights(targets, weights, vocab)
  # Ignored positions still go through the gather: point them at row 0 so that no index is ever
  # negative or out of bounds; their zero weight then drops them.
  safe_targets = jnp.where(effective != 0, targets, 0)

  log_normaliser = jax.nn.logsumexp(logits, axis=-1)                                     # [B, T]
  # A one-hot contraction rather than a gather: under a batch- or vocab-sharded mesh its backward
  # stays sharded, where the gather's scatter-add is materialised replicated by GSPMD.
  target_logit = jnp.einsum("...v,...v->...", logits, jax.nn.one_hot(safe_targets, vocab, dtype=logits.dtype))
  ce = log_normaliser - target_logit

  counted = effective != 0
  # "The target is an argmax" as "its logit reaches the row maximum": the same count (up to exact
  # ties, which argmax breaks by index) without a variadic (value, index) reduction over V, which
  # XLA:CPU runs slowly.
  predicted_right = target_logit >= jnp.max(logits, axis=-1)
  out_of_range = (targets >= vocab) & (weights != 0)
  return {
      "ce_sum": jnp.sum(ce * effective),
      "z_sum": z_loss_weight * jnp.sum(jnp.square(log_normaliser) * effective),
      "weight_sum": jnp.sum(effective),
      "token_count": jnp.sum(counted.astype(jnp.float32)),
      "correct_count": jnp.sum((counted & predicted_right).astype(jnp.float32)),
      "out_of_range_count": jnp.sum(out_of_range.astype(jnp.float32)),
  }


# ------------------------------------------------------------------------------------------
# Chunked: LM head + loss over chunks of sequence positions
# ------------------------------------------------------------------------------------------

_LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
_HEAD_AXES = ("embed", "vocab")


def _chunk_logits(hidden: jax.Array, head: jax.Array, scale: jax.Array | None) -> jax.Array:
  """hidden [B, c, D] (compute dtype) x head [D, V] -> fp32 logits [B, c, V], as the decoder;
  with `scale` [1, V], head holds int8 values and the logits are (hidden . head) * scale."""
  if scale is None:
    logits = jnp.einsum("bcd,dv->bcv", hidden, head, preferred_element_type=jnp.float32)
  else:
    from qwix import QArray
    from molmo_jax.quantize import weight_only_dot_general
    logits = weight_only_dot_general(hidden, QArray(head, scale), (((2,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits, _LOGITS_AXES)


def _chunk_hidden_grad(dlogits: jax.Array, head: jax.Array, scale: jax.Array | None,
                       dtype) -> jax.Array:
  """dlogits [B, c, V] fp32 -> d hidden [B, c, D] fp32: dlogits . head^T with both operands in
  `dtype` (the compute dtype); for an int8 head (dlogits * scale) . q^T."""
  if scale is not None:
    dlogits = dlogits * scale.astype(jnp.float32)
  return jnp.einsum("bcv,dv->bcd", dlogits.astype(dtype), head.astype(dtype),
                    preferred_element_type=jnp.float32)


def _split_chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
  """[B, T, ...] -> [T'/c, B, c, ...], T padded up to T' (a multiple of c) with `fill`."""
  b, t = x.shape[:2]
  pad = -t % chunk
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((b, (t + pad) // chunk, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _zeros_like_sums() -> dict[str, jax.Array]:
  return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_sums(hidden: jax.Array, head: jax.Array, head_scale: jax.Array | None,
                  targets: jax.Array, weights: jax.Array,
                  z_loss_weight: float) -> dict[str, jax.Array]:
  """hidden [n, B, c, D], targets/weights [n, B, c], head [D, V] (head_scale [1, V] or None)
  -> the `loss_sums` dict."""
  def body(acc, xs):
    h, t, w = xs
    sums = _sums_from_logits(_chunk_logits(h, head, head_scale), t, w, z_loss_weight)
    return jax.tree.map(jnp.add, acc, sums), None

  return jax.lax.scan(body, _zeros_like_sums(), (hidden, targets, weights))[0]


def _chunked_sums_fwd(hidden, head, head_scale, targets, weights, z_loss_weight):
  # Residuals are the inputs only (alive anyway); no logits are kept.
  return (_chunked_sums(hidden, head, head_scale, targets, weights, z_loss_weight),
          (hidden, head, head_scale, targets, weights))


def _chunked_sums_bwd(z_loss_weight, residuals, cotangents):
  """d(ce_sum)/dlogits = w (softmax - onehot); d(z_sum)/dlogits = z_loss_weight w 2 lse softmax.
  The other sums are counts (no gradient); an int8 head gets none either."""
  hidden, head, head_scale, targets, weights = residuals
  g_ce, g_z = cotangents["ce_sum"], cotangents["z_sum"]
  vocab = head.shape[-1]
  quantized = head_scale is not None

  def body(head_grad, xs):
    h, t, w = xs
    logits = _chunk_logits(h, head, head_scale)
    effective = _effective_weights(t, w, vocab)
    safe_targets = jnp.where(effective != 0, t, 0)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - lse)
    onehot = jax.nn.one_hot(safe_targets, vocab, dtype=jnp.float32)
    scale = (g_ce + g_z * z_loss_weight * 2.0 * lse) * effective[..., None]
    dlogits = scale * probs - (g_ce * effective)[..., None] * onehot
    dlogits = nn.with_logical_constraint(dlogits, _LOGITS_AXES)
    dh = _chunk_hidden_grad(dlogits, head, head_scale, h.dtype)
    if not quantized:
      head_grad = head_grad + jnp.einsum("bcd,bcv->dv", h, dlogits.astype(h.dtype),
                                         preferred_element_type=jnp.float32)
      head_grad = nn.with_logical_constraint(head_grad, _HEAD_AXES)
    return head_grad, dh.astype(h.dtype)

  if quantized:
    _, hidden_grad = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, weights))
    return (hidden_grad, np.zeros(head.shape, jax.dtypes.float0), jnp.zeros_like(head_scale),
            None, None)
  init = nn.with_logical_constraint(jnp.zeros(head.shape, jnp.float32), _HEAD_AXES)
  head_grad, hidden_grad = jax.lax.scan(body, init, (hidden, targets, weights))
  return hidden_grad, head_grad.astype(head.dtype), None, None, None


_chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd)


def chunked_loss_sums(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array,
                      weights: jax.Array, z_loss_weight: float = 0.0,
                      chunk_size: int = 512, head_scale: jax.Array | None = None
                      ) -> dict[str, jax.Array]:
  """`loss_sums(hidden @ lm_head, ...)` without materialising the [B, T, V] logits.

  Args:
    hidden: [B, T, D] final hidden states (after the final norm) in the compute dtype.
    lm_head: [D, V] LM-head kernel, already cast to the compute dtype (as the decoder does);
      logits are the product accumulated in fp32, exactly as `Decoder.__call__` computes them.
      With `head_scale`: the int8 values q of a weight-only quantized head.
    targets, weights, z_loss_weight: as in `loss_sums`.
    chunk_size: sequence positions per chunk c; only [B, c, V] fp32 logits exist at a time, in the
      forward and in the backward pass (which recomputes them). T need not divide by c (the
      last chunk is padded with ignored positions).
    head_scale: [1, V] per-output-channel scale s of an int8 `lm_head` (molmo_jax/quantize.py):
      the logits are (hidden . q) * s (`quantize.weight_only_dot_general`), and the head, a
      frozen base weight, gets a zero gradient.

  Returns the `loss_sums` dict; gradients flow to `hidden` and (a float) `lm_head`.
  """
  if hidden.ndim != 3 or lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
    raise ValueError(f"chunked_loss_sums: expected hidden [B, T, D] and lm_head [D, V], got "
                     f"{hidden.shape} and {lm_head.shape}")
  _check_targets(targets, weights, hidden.shape[:2], "hidden")
  if chunk_size < 1:
    raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
  if head_scale is not None and head_scale.shape != (1, lm_head.shape[1]):
    raise ValueError(f"chunked_loss_sums: head_scale must be [1, V] = (1, {lm_head.shape[1]}), "
                     f"got {head_scale.shape}")
  chunk = min(chunk_size, hidden.shape[1])
  # An int8 head stays int8 here: each chunk converts the values inside its matmul.
  head = lm_head if head_scale is not None else lm_head.astype(hidden.dtype)
  return _chunked_sums(_split_chunks(hidden, chunk, 0), head, head_scale,
                       _split_chunks(targets, chunk, -1), _split_chunks(weights, chunk, 0),
                       float(z_loss_weight))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  # A batch without loss tokens gives loss 0 (and zero gradients), not NaN.
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def loss_from_sums(sums: Mapping[str, jax.Array],
                   normaliser: jax.Array | float | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Normalised loss and metrics from (possibly accumulated) `loss_sums`.

  `normaliser` defaults to `sums["weight_sum"]`; pass the global batch's weight sum when `sums`
  covers only a micro-batch so that gradients of the pieces add up to the global-batch gradient.
  """
  missing = [k for k in SUM_KEYS if k not in sums]
  if missing:
    raise ValueError(f"sums: missing key(s) {missing}; expected the dict returned by loss_sums")
  denominator = sums["weight_sum"] if normaliser is None else jnp.asarray(normaliser, jnp.float32)
  ce_loss = _safe_divide(sums["ce_sum"], denominator)
  z_loss = _safe_divide(sums["z_sum"], denominator)
  loss = ce_loss + z_loss
  metrics = {
      "loss": loss,
      "ce_loss": ce_loss,
      "z_loss": z_loss,
      "weight_sum": sums["weight_sum"],
      "token_count": sums["token_count"],
      "accuracy": _safe_divide(sums["correct_count"], sums["token_count"]),
      "out_of_range_count": sums["out_of_range_count"],
  }
  return loss, metrics


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                        z_loss_weight: float = 0.0,
                        normaliser: jax.Array | float | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean token CE (+ z-loss): (loss, metrics). See `loss_sums` for the arguments.

  metrics: loss, ce_loss, z_loss, weight_sum, token_count, accuracy (fraction of counted tokens
  whose argmax is the target, unweighted), out_of_range_count.
  """
  return loss_from_sums(loss_sums(logits, targets, weights, z_loss_weight), normaliser)
