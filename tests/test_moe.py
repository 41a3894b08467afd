"""The MoE layer (the reference's olmo/model.py (OLMoEBlock)) against a NumPy reference: routing, both implementations, drops, grads.

Legend: B batch rows (= capacity groups), T tokens per row, D width, E experts, k experts per
token, F expert MLP width, C capacity per expert and row.

Reference rules (the reference's olmo/model.py (OLMoEBlock) and molmo_jax/models/moe.py's contract): probs = softmax over all E
experts, top-k, no renormalisation unless `moe_normalize_topk`; y = sum_k p_k * expert_k(x).
Capacity path: C = ceil(T*k/E * factor) per row; assignments are served first choices first
(all tokens' first choices in token order, then second choices, ...); a dropped assignment
contributes nothing.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax.models import moe
from molmo_jax.models.moe import MoEBlock

TOL = 1e-5
B, T = 2, 16


@pytest.fixture(scope="module")
def setup():
  cfg = C.tiny("olmoe").llm
  e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim
  rng = np.random.default_rng(0)
  params = {"router": 0.3 * rng.standard_normal((d, e)),
            "gate": 0.15 * rng.standard_normal((e, d, f)),
            "up": 0.15 * rng.standard_normal((e, d, f)),
            "down": 0.15 * rng.standard_normal((e, f, d))}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  x = jnp.asarray(rng.standard_normal((B, T, d)), jnp.float32)
  return cfg, params, x


def apply(cfg, params, x):
  return jax.jit(lambda p, x: MoEBlock(cfg).apply({"params": p}, x))(params, x)


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64)
# ----------------------------------------------------------------------------------------------

def reference_routing(x, router, k, normalize):
  logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]         # best first
  weights = np.take_along_axis(probs, experts, axis=-1)
  if normalize:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights, experts


def expert_output(params, e, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  gate = x @ p["gate"][e]
  return (gate / (1.0 + np.exp(-gate)) * (x @ p["up"][e])) @ p["down"][e]


def capacity_keep(experts, num_experts, cap):
  """[B, T, k] bool: the assignment got a slot (choice-major, then token order, per row)."""
  keep = np.zeros(experts.shape, bool)
  for b in range(experts.shape[0]):
    used = np.zeros(num_experts, int)
    for j in range(experts.shape[2]):
      for t in range(experts.shape[1]):
        e = experts[b, t, j]
        if used[e] < cap:
          keep[b, t, j] = True
          used[e] += 1
  return keep


def reference_moe(cfg, params, x, keep=None):
  x = np.asarray(x, np.float64)
  weights, experts = reference_routing(x, params["router"], cfg.experts_per_token, cfg.moe_normalize_topk)
  if keep is None:
    keep = np.ones(experts.shape, bool)
  y = np.zeros_like(x)
  for b, t, j in np.ndindex(*experts.shape):
    if keep[b, t, j]:
      y[b, t] += weights[b, t, j] * expert_output(params, experts[b, t, j], x[b, t])
  return y, weights, experts


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_router_weights_renormalised_only_on_request(setup, normalize):
  cfg, params, x = setup
  logits = jnp.einsum("btd,de->bte", x, params["router"]).reshape(B * T, -1)
  probs, weights, experts = moe.route(logits, cfg.experts_per_token, normalize)
  sums = np.asarray(weights).sum(-1)
  if normalize:
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)
  else:
    assert np.all(sums < 0.999), sums.max()
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)
  want_weights, want_experts = reference_routing(x.reshape(B * T, -1), params["router"],
                                                 cfg.experts_per_token, normalize)
  np.testing.assert_array_equal(np.asarray(experts), want_experts)
  np.testing.assert_allclose(np.asarray(weights), want_weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_ragged_matches_reference(setup, normalize):
  cfg, params, x = setup
  cfg = dataclasses.replace(cfg, moe_impl="ragged", moe_normalize_topk=normalize)
  y, _ = apply(cfg, params, x)
  want, _, _ = reference_moe(cfg, params, x)
  np.testing.assert_allclose(np.asarray(y), want, atol=TOL, rtol=0)
  assert np.abs(want).max() > 0.1
  other, _, _ = reference_moe(dataclasses.replace(cfg, moe_normalize_topk=not normalize), params, x)
  assert np.abs(other - want).max() > 1e-2          # the flag changes the output


def test_capacity_without_drops_equals_ragged(setup):
  cfg, params, x = setup
  no_drop = cfg.num_experts / cfg.experts_per_token
  ragged, _ = apply(dataclasses.replace(cfg, moe_impl="ragged"), params, x)
  capacity, _ = apply(dataclasses.replace(cfg, moe_impl="capacity", moe_capacity_factor=no_drop), params, x)
  np.testing.assert_allclose(np.asarray(capacity), np.asarray(ragged), atol=TOL, rtol=0)


def test_small_capacity_drops_tokens(setup):
  cfg, params, x = setup
  factor = 0.25
  cfg = dataclasses.replace(cfg, moe_impl="capacity", moe_capacity_factor=factor)
  k, e = cfg.experts_per_token, cfg.num_experts
  cap = max(1, math.ceil(T * k / e * factor))
  _, _, experts = reference_moe(cfg, params, x)
  keep = capacity_keep(experts, e, cap)
  all_dropped = ~keep.any(-1)
  some_dropped = ~keep.all(-1) & ~all_dropped
  assert all_dropped.sum() > 0 and some_dropped.sum() > 0, (cap, keep.sum())

  y, _ = apply(cfg, params, x)
  y = np.asarray(y)
  want, _, _ = reference_moe(cfg, params, x, keep)
  np.testing.assert_allclose(y, want, atol=TOL, rtol=0)
  assert np.all(y[all_dropped] == 0.0)              # exactly zero: the token keeps only its residual
  ragged, _ = apply(dataclasses.replace(cfg, moe_impl="ragged"), params, x)
  ragged, kept = np.asarray(ragged), keep.all(-1)
  assert np.abs(ragged[~kept] - y[~kept]).max(axis=-1).min() > 1e-3   # every token with a drop differs
  np.testing.assert_allclose(ragged[kept], y[kept], atol=TOL, rtol=0)


def test_gradients_flow_through_ragged_dot(setup):
  cfg, params, x = setup
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

  def grads(impl, factor):
    c = dataclasses.replace(cfg, moe_impl=impl, moe_capacity_factor=factor)
    loss = lambda p, x: jnp.sum(MoEBlock(c).apply({"params": p}, x)[0] * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  ragged = grads("ragged", 1.0)
  capacity = grads("capacity", cfg.num_experts / cfg.experts_per_token)
  for path, g in jax.tree_util.tree_flatten_with_path(ragged)[0]:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 1e-4, path              # every parameter (and x) receives a gradient
  for g_r, g_c in zip(jax.tree.leaves(ragged), jax.tree.leaves(capacity)):
    np.testing.assert_allclose(np.asarray(g_r), np.asarray(g_c), atol=TOL, rtol=0)
  # Every expert is used by some token, so every expert's weights get a gradient.
  per_expert = np.abs(np.asarray(ragged[0]["gate"])).reshape(cfg.num_experts, -1).max(-1)
  assert np.all(per_expert > 0), per_expert
