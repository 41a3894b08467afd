"""Mixture-of-experts SwiGLU layer (the reference's olmo/model.py (OLMoEBlock), OLMoE / MolmoE-1B).

Legend: B batch, T length, N = B*T tokens, D width, E experts, k experts per token,
F expert MLP width, G groups (batch rows) in the capacity path, C capacity per expert and group.

Router: probs = softmax(x W_r) over all experts (float32), top-k, NO renormalisation by default;
y = sum_k p_k * expert_k(x). Two interchangeable implementations:

* "ragged" (dropless): sort the N*k (token, expert) assignments by expert and run the three expert
  matmuls as grouped matmuls with `jax.lax.ragged_dot`. Exact; no token is dropped.
* "capacity": one-hot dispatch/combine tensors [G, T, E, C] and dense einsums. Tokens beyond an
  expert's capacity C = ceil(T*k/E * capacity_factor) are dropped (they keep their residual).
  The expert axis of every intermediate is constrained to the `expert` mesh axis, so GSPMD lays
  out expert parallelism with all-to-all style collectives.

Both return the auxiliary losses (load balancing, router z-loss) as values; the weights that
multiply them live in the training config (0.0 for the release).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from molmo_jax.config import LLMConfig
from molmo_jax.models import capture
from molmo_jax.models.layers import constrain, kernel_init, logical

Array = jax.Array


def route(logits: Array, top_k: int, normalize: bool) -> tuple[Array, Array, Array]:
  """logits [N, E] -> (probs [N, E], weights [N, k], experts [N, k] int32), float32."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, experts


def auxiliary_losses(logits: Array, probs: Array, experts: Array) -> dict[str, Array]:
  """Switch-style load balancing E * sum_e f_e * P_e, and the router z-loss mean(lse^2)."""
  num_experts = probs.shape[-1]
  assigned = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)   # [N, E]
  fraction = jnp.mean(assigned, axis=0) / experts.shape[-1]
  load_balance = num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))
  router_z = jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))
  return {"moe_load_balance": load_balance, "moe_router_z": router_z}


def ragged_experts(x: Array, weights: Array, experts: Array, gate: Array, up: Array,
                   down: Array) -> Array:
  """Dropless grouped matmul. x [N, D], weights/experts [N, k], gate/up [E, D, F], down [E, F, D]."""
  n, k = experts.shape
  num_experts = gate.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)                  # assignments grouped by expert
  tokens = order // k
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = jnp.take(x, tokens, axis=0)
  h = nn.silu(jax.lax.ragged_dot(xs, gate.astype(x.dtype), group_sizes))
  h = h * jax.lax.ragged_dot(xs, up.astype(x.dtype), group_sizes)
  h = checkpoint_name(h, "mlp_hidden")
  ys = jax.lax.ragged_dot(h, down.astype(x.dtype), group_sizes)        # [N*k, D], sorted order
  unsorted = jnp.zeros_like(ys).at[order].set(ys)
  per_choice = unsorted.reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", per_choice, weights.astype(per_choice.dtype))


def capacity(tokens_per_group: int, num_experts: int, top_k: int, factor: float) -> int:
  return max(1, min(tokens_per_group * top_k,
                    math.ceil(tokens_per_group * top_k / num_experts * factor)))


def capacity_experts(x: Array, weights: Array, experts: Array, gate: Array, up: Array, down: Array,
                     capacity_factor: float) -> Array:
  """Dispatch/combine path. x [G, T, D], weights/experts [G, T, k]."""
  g, t, k = experts.shape
  num_experts = gate.shape[0]
  cap = capacity(t, num_experts, k, capacity_factor)
  # Priority: earlier tokens first, and a token's first choice before its later ones.
  choice_major = jnp.swapaxes(experts, 1, 2).reshape(g, k * t)                      # [G, kT]
  onehot = jax.nn.one_hot(choice_major, num_experts, dtype=jnp.int32)              # [G, kT, E]
  slot = jnp.cumsum(onehot, axis=1) * onehot - 1                                   # -1 = not routed
  slot = jnp.max(slot, axis=-1).reshape(g, k, t).swapaxes(1, 2)                    # [G, T, k]
  keep = (slot >= 0) & (slot < cap)
  slot_onehot = jax.nn.one_hot(jnp.where(keep, slot, cap), cap, dtype=x.dtype)     # [G, T, k, C]
  expert_onehot = jax.nn.one_hot(experts, num_experts, dtype=x.dtype)              # [G, T, k, E]
  dispatch = jnp.einsum("gtke,gtkc->gtec", expert_onehot, slot_onehot)
  combine = jnp.einsum("gtke,gtkc,gtk->gtec", expert_onehot, slot_onehot, weights.astype(x.dtype))
  dispatch = constrain(dispatch, ("activation_batch", "activation_length", "activation_exp",
                                  "activation_capacity"))
  xe = jnp.einsum("gtec,gtd->egcd", dispatch, x)
  xe = constrain(xe, ("activation_exp", "activation_batch", "activation_capacity", "activation_embed"))
  h = nn.silu(jnp.einsum("egcd,edf->egcf", xe, gate.astype(x.dtype)))
  h = h * jnp.einsum("egcd,edf->egcf", xe, up.astype(x.dtype))
  h = checkpoint_name(h, "mlp_hidden")
  ye = jnp.einsum("egcf,efd->egcd", h, down.astype(x.dtype))
  ye = constrain(ye, ("activation_exp", "activation_batch", "activation_capacity", "activation_embed"))
  return jnp.einsum("gtec,egcd->gtd", combine, ye)


class MoEBlock(nn.Module):
  """x [B, T, D] -> (y [B, T, D], aux losses)."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    cfg = self.config
    b, t, d = x.shape
    e, f = cfg.num_experts, cfg.expert_mlp_dim
    router = self.param("router", logical(kernel_init(), ("embed", None)), (d, e), self.param_dtype)
    expert_param = lambda name, shape, axes: self.param(
        name, logical(kernel_init(-2, -1, (0,)), axes), shape, self.param_dtype)
    gate = expert_param("gate", (e, d, f), ("exp", "embed", "mlp"))
    up = expert_param("up", (e, d, f), ("exp", "embed", "mlp"))
    down = expert_param("down", (e, f, d), ("exp", "mlp", "embed"))

    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router.astype(jnp.float32))
    probs, weights, experts = route(logits.reshape(b * t, e), cfg.experts_per_token,
                                    cfg.moe_normalize_topk)
    aux = auxiliary_losses(logits.reshape(b * t, e), probs, experts)
    capture.sow(self, "router_experts", experts.reshape(b, t, -1))
    capture.sow(self, "router_weights", weights.reshape(b, t, -1))
    if cfg.moe_impl == "ragged":
      y = ragged_experts(x.reshape(b * t, d), weights, experts, gate, up, down).reshape(b, t, d)
    elif cfg.moe_impl == "capacity":
      k = cfg.experts_per_token
      y = capacity_experts(x, weights.reshape(b, t, k), experts.reshape(b, t, k), gate, up, down,
                           cfg.moe_capacity_factor)
    else:
      raise ValueError(f"llm.moe_impl {cfg.moe_impl!r} unknown; expected ragged or capacity")
    return y.astype(x.dtype), aux
