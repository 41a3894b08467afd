"""Mixture-of-experts SwiGLU layer (the reference's olmo/model.py (OLMoEBlock), OLMoE / MolmoE-1B).

Legend: B batch, T length, N = B*T tokens, D width, E experts, k experts per token,
F expert MLP width, G groups (batch rows) in the capacity path, C capacity per expert and group.

Router: probs = softmax(x W_r) over all experts (float32), top-k, NO renormalisation by default;
y = sum_k p_k * expert_k(x). Two interchangeable implementations:

* "ragged" (dropless): sort the N*k (token, expert) assignments by expert and run the three expert
  matmuls as grouped matmuls with `jax.lax.ragged_dot`. Exact; no token is dropped.
  On a mesh whose `expert` axis is > 1 it runs expert parallel (`expert_parallel_experts`, the
  default, see `LLMConfig.moe_expert_parallel`): inside `shard_map` every device sorts its own
  tokens' assignments by expert, sends each expert shard its rows with an all-to-all over the
  expert axis, runs the grouped matmuls on its E/X local experts only, and sends the results
  back with the reverse all-to-all. Expert weights stay sharded over `expert` (they are only
  gathered over the FSDP axis, like every other FSDP weight).
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


# ----------------------------------------------------------------------------------------------
# Expert parallelism (dropless): shard_map + all-to-all over the expert mesh axis
# ----------------------------------------------------------------------------------------------
#
# Extra legend: X expert-parallel shards (size of the mesh axes the expert dimension is sharded
# over), El = E / X local experts, n local tokens (N / data-parallel shards), R = n*k rows a
# device sends in all (the exact dropless bound on what one source can send one target).

def _axes(entry: Any) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a name or a tuple of names) as a tuple of names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _resolve_transport(choice: str, mesh: Any) -> str:
  """'auto' -> ragged_all_to_all where XLA implements it (TPU, GPU), all_to_all on CPU."""
  if choice != "auto":
    return choice
  device = getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None) or jax.default_backend()
  return "all_to_all" if platform == "cpu" else "ragged_all_to_all"


def expert_parallel_plan(num_tokens: int, num_experts: int, choice: str = "auto"
                         ) -> dict[str, Any] | None:
  """How to run the dropless layer expert parallel on the current mesh, or None for GSPMD.

  None when: `choice` is "gspmd", no mesh is set, the expert dimension of the expert weights is
  not sharded (expert axis of size 1), or the tokens cannot be split evenly over the
  data-parallel shards. The mesh axes come from the logical rules (molmo_jax/sharding.py).
  """
  if choice == "gspmd":
    return None
  if choice not in ("auto", "ragged_all_to_all", "all_to_all"):
    raise ValueError(f"llm.moe_expert_parallel {choice!r} unknown; expected auto, "
                     f"ragged_all_to_all, all_to_all or gspmd")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  sizes = dict(mesh.shape)
  spec = lambda names: tuple(_axes(a) for a in nn.logical_to_mesh_axes(names))
  token_axes = spec(("activation_batch",))[0]
  gate_axes = spec(("exp", "embed", "mlp"))
  down_axes = spec(("exp", "mlp", "embed"))
  expert_axes = tuple(a for a in gate_axes[0] if sizes[a] > 1)
  shards = math.prod(sizes[a] for a in expert_axes)
  token_shards = math.prod(sizes[a] for a in token_axes)
  if shards <= 1 or not set(expert_axes) <= set(token_axes):
    return None
  if num_tokens % token_shards or num_experts % shards:
    return None
  return {"token_axes": token_axes, "expert_axes": expert_axes, "shards": shards,
          "gate_spec": gate_axes, "down_spec": down_axes,
          "transport": _resolve_transport(choice, mesh)}


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def _local_expert_parallel(x: Array, logits: Array, gate: Array, up: Array, down: Array, *,
                           plan: dict[str, Any], top_k: int, normalize: bool
                           ) -> tuple[Array, Array, Array]:
  """Per-device body. x [n, D], router logits [n, E]; gate/up [El, D', F'], down [El, F', D']
  (D' / F' the local FSDP / tensor shards). Returns this device's (y [n, D] summed over all of
  F, probs [n, E], experts [n, k]). Routing runs here, on local tokens: GSPMD cannot split
  top_k over tokens and would gather every token's router logits onto every chip."""
  probs, weights, experts = route(logits, top_k, normalize)
  num_experts = logits.shape[-1]
  n, k = experts.shape
  shards, axes = plan["shards"], plan["expert_axes"]
  rows = n * k
  # FSDP: gather the embed dimension of the local experts (never the expert dimension). The
  # transpose of this gather is the usual reduce-scatter of the weight gradient.
  gate_embed, gate_mlp = plan["gate_spec"][1], plan["gate_spec"][2]
  down_mlp, down_embed = plan["down_spec"][1], plan["down_spec"][2]
  if gate_embed:
    gate = jax.lax.all_gather(gate, gate_embed, axis=1, tiled=True)
    up = jax.lax.all_gather(up, gate_embed, axis=1, tiled=True)
  if down_embed:
    down = jax.lax.all_gather(down, down_embed, axis=2, tiled=True)
  local_experts = gate.shape[0]
  me = jax.lax.axis_index(axes)

  # 1. This device's assignments sorted by expert; shard j's experts form one contiguous run.
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_rows = jnp.take(x, order // k, axis=0)                                  # [R, D]
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)             # [E]
  send_sizes = counts.reshape(shards, local_experts).sum(-1)                     # [X]
  send_offsets = _exclusive_cumsum(send_sizes)
  # Everyone's per-expert counts: row i = what source i sends, per expert.
  all_counts = jax.lax.all_gather(counts, axes, tiled=False)                     # [X, E]
  received = jax.lax.dynamic_slice_in_dim(all_counts, me * local_experts, local_experts, axis=1)
  recv_sizes = received.sum(-1)                                                  # [X]

  # 2. Forward all-to-all into a receive buffer of X slots of R rows: source i's rows (sorted
  # by local expert) start at row i*R. R = n*k is the exact dropless bound.
  dim = x.shape[-1]
  if plan["transport"] == "ragged_all_to_all":
    buffer = jax.lax.ragged_all_to_all(
        sorted_rows, jnp.zeros((shards * rows, dim), x.dtype), send_offsets, send_sizes,
        jnp.full((shards,), me * rows, jnp.int32), recv_sizes, axis_name=axes)
  else:
    slot = jnp.arange(rows, dtype=jnp.int32)
    index = send_offsets[:, None] + slot[None, :]                                # [X, R]
    valid = slot[None, :] < send_sizes[:, None]
    packed = jnp.take(sorted_rows, jnp.where(valid, index, 0).reshape(-1), axis=0)
    packed = packed * valid.reshape(-1, 1).astype(packed.dtype)
    buffer = jax.lax.all_to_all(packed, axes, 0, 0, tiled=True)                  # [X*R, D]

  # 3. Group the received rows by local expert and run the grouped matmuls.
  slot = jnp.arange(rows, dtype=jnp.int32)
  bounds = jnp.cumsum(received, axis=-1)                                         # [X, El]
  local_id = jnp.sum(slot[None, :, None] >= bounds[:, None, :], axis=-1)         # [X, R]
  local_id = jnp.where(slot[None, :] < recv_sizes[:, None], local_id, local_experts).reshape(-1)
  regroup = jnp.argsort(local_id, stable=True)
  group_sizes = received.sum(0).astype(jnp.int32)                                # [El]
  xs = jnp.take(buffer, regroup, axis=0)
  h = nn.silu(jax.lax.ragged_dot(xs, gate.astype(x.dtype), group_sizes))
  h = h * jax.lax.ragged_dot(xs, up.astype(x.dtype), group_sizes)
  h = checkpoint_name(h, "mlp_hidden")
  ys = jax.lax.ragged_dot(h, down.astype(x.dtype), group_sizes)                  # partial over F
  ys = jnp.take(ys, jnp.argsort(regroup), axis=0)                                # buffer order

  # 4. Reverse all-to-all: every row goes back to its source, in the source's sorted order.
  if plan["transport"] == "ragged_all_to_all":
    sent = all_counts.reshape(shards, shards, local_experts).sum(-1)             # [src, dst]
    back_offsets = _exclusive_cumsum(sent, axis=1)[:, me]                        # [X]
    returned = jax.lax.ragged_all_to_all(
        ys, jnp.zeros((rows, dim), ys.dtype), jnp.arange(shards, dtype=jnp.int32) * rows,
        recv_sizes, back_offsets, send_sizes, axis_name=axes)                    # [R, D]
  else:
    back = jax.lax.all_to_all(ys, axes, 0, 0, tiled=True)                        # [X*R, D]
    position = jnp.arange(rows, dtype=jnp.int32)
    target = jnp.take(flat, order) // local_experts
    returned = jnp.take(back, target * rows + position - jnp.take(send_offsets, target), axis=0)

  # 5. Undo the sort, weight the k choices, and finish the sum over the tensor-sharded F.
  per_choice = jnp.take(returned, jnp.argsort(order), axis=0).reshape(n, k, dim)
  y = jnp.einsum("nkd,nk->nd", per_choice, weights.astype(per_choice.dtype))
  if gate_mlp:
    y = jax.lax.psum(y, gate_mlp)
  return y, probs, experts


def expert_parallel_experts(x: Array, logits: Array, gate: Array, up: Array, down: Array,
                            plan: dict[str, Any], top_k: int, normalize: bool
                            ) -> tuple[Array, Array, Array]:
  """Expert-parallel dropless layer with routing: x [N, D], router logits [N, E] ->
  (y [N, D], probs [N, E] float32, experts [N, k]).

  Same numbers as `route` + `ragged_experts`; `plan` comes from `expert_parallel_plan`.
  """
  from jax.sharding import PartitionSpec as P
  entry = lambda axes: None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))
  tokens = P(entry(plan["token_axes"]), None)
  gate_spec = P(*map(entry, plan["gate_spec"]))
  down_spec = P(*map(entry, plan["down_spec"]))
  body = jax.shard_map(
      lambda *a: _local_expert_parallel(*a, plan=plan, top_k=top_k, normalize=normalize),
      in_specs=(tokens, tokens, gate_spec, gate_spec, down_spec), out_specs=(tokens,) * 3)
  return body(x, logits, gate, up, down)


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
    logits = logits.reshape(b * t, e)
    k = cfg.experts_per_token
    plan = expert_parallel_plan(b * t, e, cfg.moe_expert_parallel) if cfg.moe_impl == "ragged" else None
    if plan is not None:
      y, probs, experts = expert_parallel_experts(x.reshape(b * t, d), logits, gate, up, down, plan,
                                                  k, cfg.moe_normalize_topk)
      return y.reshape(b, t, d).astype(x.dtype), auxiliary_losses(logits, probs, experts)
    probs, weights, experts = route(logits, k, cfg.moe_normalize_topk)
    aux = auxiliary_losses(logits, probs, experts)
    capture.sow(self, "router_experts", experts.reshape(b, t, -1))
    capture.sow(self, "router_weights", weights.reshape(b, t, -1))
    if cfg.moe_impl == "ragged":
      y = ragged_experts(x.reshape(b * t, d), weights, experts, gate, up, down).reshape(b, t, d)
    elif cfg.moe_impl == "capacity":
      y = capacity_experts(x, weights.reshape(b, t, k), experts.reshape(b, t, k), gate, up, down,
                           cfg.moe_capacity_factor)
    else:
      raise ValueError(f"llm.moe_impl {cfg.moe_impl!r} unknown; expected ragged or capacity")
    return y.astype(x.dtype), aux
