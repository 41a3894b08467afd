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
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

# Keys of the dict `loss_sums` returns. All are sums over tokens, so micro-batch and per-device
# results combine by addition (tree-add them, or `jax.lax.psum` them inside shard_map).
SUM_KEYS = ("ce_sum", "z_sum", "weight_sum", "token_count", "correct_count", "out_of_range_count")


def _check_shapes(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> None:
  if logits.ndim != 3:
    raise ValueError(f"logits: expected [B, T, V], got shape {logits.shape}")
  if targets.shape != logits.shape[:2]:
    raise ValueError(f"targets: expected shape {logits.shape[:2]} (the [B, T] of logits), "
                     f"got {targets.shape}")
  if weights.shape != targets.shape:
    raise ValueError(f"weights: expected the shape of targets {targets.shape}, got {weights.shape}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")


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
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  effective = _effective_weights(targets, weights, vocab)
  # Ignored positions still go through the gather: point them at row 0 so that no index is ever
  # negative or out of bounds; their zero weight then drops them.
  safe_targets = jnp.where(effective != 0, targets, 0)

  log_normaliser = jax.nn.logsumexp(logits, axis=-1)                                     # [B, T]
  # A one-hot contraction rather than a gather: under a batch- or vocab-sharded mesh its backward
  # stays sharded, where the gather's scatter-add is materialised replicated by GSPMD.
  target_logit = jnp.einsum("btv,btv->bt", logits, jax.nn.one_hot(safe_targets, vocab, dtype=logits.dtype))
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
