"""Building blocks shared by the vision tower, the connector and the decoder.

Legend:
  B batch (or batch*crops in the vision tower)   T query length   S key length (cache length)
  D model width   H query heads   K key/value heads   G = H // K query heads per kv head
  h head dim   F MLP width

Numerics follow the reference: norms, RoPE and the attention softmax run in float32 whatever the
compute dtype; the result is cast back to the compute dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any

NEG_INF = float(jnp.finfo(jnp.float32).min)


def embedding_init(std: float = 0.02) -> Callable:
  return nn.initializers.normal(stddev=std)


def kernel_init(in_axis: int | tuple[int, ...] = -2, out_axis: int | tuple[int, ...] = -1,
                batch_axis: tuple[int, ...] = ()) -> Callable:
  """Fan-in scaled init for kernels, so that a freshly initialised model keeps O(1) activations.

  The reference draws every kernel from N(0, 0.02) because it starts from pretrained CLIP and LLM
  weights; from scratch (the built-in demo) that makes the connector's output vanish: the
  SwiGLU projector squares already small pooled features and the image signal never reaches
  the decoder. Converted checkpoints overwrite all of this.
  """
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


# Logical names of the activations that matter for layout. Pinning the input AND output of every
# matmul leaves GSPMD one choice for an FSDP-sharded kernel: gather the weight. Without both pins
# it may instead keep the weight sharded and compute full-batch partial sums (a [B, T, V] logits
# buffer per chip for the LM head).
BTD = ("activation_batch", "activation_length", "activation_embed")
BTF = ("activation_batch", "activation_length", "activation_mlp")
BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


_NATIVE_DOTS = contextvars.ContextVar("molmo_jax_native_dots", default=False)


@contextlib.contextmanager
def native_dots() -> Iterator[None]:
  """Inside, DenseGeneral contracts its kernel in the kernel's own N-D shape (lax.dot_general)
  instead of as a 2-D matmul. qwix (molmo_jax/quantize.py) needs this: it quantizes the
  parameter it sees in the matmul and keeps the parameter's logical axes, which a reshaped
  kernel no longer matches. Same sums; only the CPU speed of the backward pass differs."""
  token = _NATIVE_DOTS.set(True)
  try:
    yield
  finally:
    _NATIVE_DOTS.reset(token)


_HOST_GEMM_GRADIENTS = contextvars.ContextVar("molmo_jax_host_gemm_gradients", default=False)


@contextlib.contextmanager
def host_gemm_gradients(enabled: bool = True) -> Iterator[None]:
  """Inside (while a function is traced), `flat_dot`'s kernel gradient x^T.g is computed from an
  explicitly transposed copy of x, a plain [in, rows] @ [rows, out] GEMM. XLA:CPU otherwise
  runs the rows-contracting product on a path 1.2-2x slower (measured at 1024 rows, widths
  256-8192). The train step enables it when its mesh is made of CPU devices; accelerators keep
  the fused transposed dot (the copy would cost memory and bandwidth there)."""
  token = _HOST_GEMM_GRADIENTS.set(enabled)
  try:
    yield
  finally:
    _HOST_GEMM_GRADIENTS.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemm_host_gradients(x: Array, kernel: Array, preferred_element_type: Any) -> Array:
  return jnp.dot(x, kernel, preferred_element_type=preferred_element_type)


def _gemm_host_gradients_fwd(x, kernel, preferred_element_type):
  return _gemm_host_gradients(x, kernel, preferred_element_type), (x, kernel)


def _gemm_host_gradients_bwd(preferred_element_type, residuals, g):
  del preferred_element_type
  x, kernel = residuals
  dx = jnp.dot(g, kernel.T.astype(g.dtype)).astype(x.dtype)
  # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers.
  dkernel = jnp.dot(jax.lax.optimization_barrier(x.T).astype(g.dtype), g).astype(kernel.dtype)
  return dx, dkernel


_gemm_host_gradients.defvjp(_gemm_host_gradients_fwd, _gemm_host_gradients_bwd)


def cast_param(kernel: Any, dtype: Dtype) -> Any:
  """kernel in `dtype`. jnp.asarray rather than .astype: under qwix (molmo_jax/quantize.py) the
  parameter is a quantized wrapper whose cast qwix intercepts here."""
  return jnp.asarray(kernel, dtype)


def flat_dot(x: Array, kernel: Array, contract: int = 1, preferred_element_type=None) -> Array:
  """x [*batch, *in] . kernel [*in, *out] -> [*batch, *out], computed as one 2-D matmul.

  The same sum as a dot_general over `contract` axes, but [prod(batch), prod(in)] @
  [prod(in), prod(out)] (the reshapes are free row-major views). With 3-D activations XLA:CPU
  computes the kernel gradient by contracting two axes and materialises transposed copies of
  the output gradient around a slower matmul path; the 2-D form is a plain GEMM in both passes.
  """
  in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
  if x.shape[x.ndim - contract:] != in_shape:
    raise ValueError(f"flat_dot: input trailing shape {x.shape[x.ndim - contract:]} does not match "
                     f"the kernel's input shape {in_shape}")
  batch_shape = x.shape[:x.ndim - contract]
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  x2, kernel2 = x.reshape(-1, n_in), kernel.reshape(n_in, n_out)
  # A quantized kernel (qwix's wrapper, molmo_jax/quantize.py) goes to qwix's matmul.
  if _HOST_GEMM_GRADIENTS.get() and isinstance(kernel2, jax.Array):
    y = _gemm_host_gradients(x2, kernel2, preferred_element_type)
  else:
    y = jnp.dot(x2, kernel2, preferred_element_type=preferred_element_type)
  return y.reshape(batch_shape + out_shape)


class DenseGeneral(nn.Module):
  """y = x . kernel (+ bias), contracting the last `len(in_shape)` axes of x.

  kernel: [*in_shape, *features] with logical names `axes`; bias: [*features]. (Flax's own
  DenseGeneral reshapes its kernel to 2-D before applying the logical constraint, which fails
  once a global mesh is set; this version keeps the kernel's true rank.)
  """

  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  contract: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.contract:]
    in_axes = tuple(range(self.contract))
    out_axes = tuple(range(self.contract, self.contract + len(features)))
    kernel = self.param("kernel", logical(kernel_init(in_axes, out_axes), self.axes),
                        in_shape + features, self.param_dtype)
    kernel = cast_param(kernel, self.dtype)
    if _NATIVE_DOTS.get():
      dims = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
      y = jax.lax.dot_general(x.astype(self.dtype), kernel, (dims, ((), ())))
    else:
      y = flat_dot(x.astype(self.dtype), kernel, self.contract)
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros, self.axes[self.contract:]), features,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps), in float32, cast back, times `scale` (no bias, no 1+w offset)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with weight and bias, statistics in float32 (the ViT's norms)."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "vit_embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def rope_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos/sin tables [B, T, h] for the half-rotation (Llama/NeoX) RoPE, float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, h/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)                        # [B, T, h]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, N, h] -> rotated, computed in float32 and cast back to x.dtype."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def causal_segment_mask(query_segments: Array, key_segments: Array, key_valid: Array,
                        query_slots: Array, key_slots: Array) -> Array:
  """Boolean attention mask [B, T, S] of the reference (the reference's olmo/data/model_preprocessor.py (several conversations per image); olmo/data/collator.py).

  A query attends a key iff the key is not padding, the key comes no later than the query
  (slot order) and seg_q <= seg_k (packed conversations see the shared image and themselves).
  """
  causal = key_slots[:, None, :] <= query_slots[:, :, None]
  segments = query_segments[:, :, None] <= key_segments[:, None, :]
  return causal & segments & key_valid[:, None, :]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None,
                          kv_heads_major: bool = False) -> Array:
  """GQA attention, softmax in float32.

  q [B, T, H, h], k/v [B, S, K, h] (or [B, K, S, h] with kv_heads_major, the KV cache's
  layout), mask [B, T, S] bool (True = attend) -> [B, T, H, h].
  Query head n uses kv head n // G (contiguous grouping, the reference's repeat_interleave).
  """
  b, t, num_heads, head_dim = q.shape
  num_kv = k.shape[1 if kv_heads_major else 2]
  groups = num_heads // num_kv
  # Heads-major operands ([B, K, G, T, h], [B, K, S, h]; without groups (G = 1, the ViT) the G
  # axis is left out): the two products are then batched matmuls whose batch axes lead, and the
  # transposes touch q/k/v, never the [.., T, S] scores.
  q = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim)))
  if groups == 1:
    q = q.transpose(0, 2, 1, 3)
  else:
    q = q.reshape(b, t, num_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)
  if not kv_heads_major:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  k = k.astype(jnp.float32)
  scores = jnp.einsum("bk...th,bksh->bk...ts", q, k)
  # GSPMD loses the batch sharding through the head reshape; pin it on the largest tensors.
  scores_axes = ("activation_batch", "activation_kv_heads", *((None,) * (scores.ndim - 4)),
                 "activation_length", None)
  scores = constrain(scores, scores_axes)
  if mask is not None:
    scores = jnp.where(mask.reshape(b, *((1,) * (scores.ndim - 3)), *mask.shape[1:]), scores, NEG_INF)
  # softmax(scores) @ v computed as (exp(scores - max) @ v) / sum(exp(scores - max)): the same
  # function (a fully masked row is uniform either way), but the normalisation divides the
  # [.., T, h] output instead of the [.., T, S] probabilities, and the gradient has no
  # softmax-Jacobian pass over the scores (2-3x faster attention on XLA:CPU, forward and backward).
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = constrain(jnp.exp(scores - peak), scores_axes)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bk...ts,bksh->bk...th", weights.astype(v.dtype), v)
  out = (out.astype(jnp.float32) / total).astype(v.dtype)
  if groups == 1:
    return out.transpose(0, 2, 1, 3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads, head_dim)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)). Used by the LLM MLP and the connector's projector."""

  hidden: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  in_axis: str = "embed"
  hidden_axis: str = "mlp"
  out_axis: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    def proj(name, features, axes):
      return DenseGeneral(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    x = constrain(x, BTD)
    gate = constrain(proj("gate", self.hidden, (self.in_axis, self.hidden_axis))(x), BTF)
    up = constrain(proj("up", self.hidden, (self.in_axis, self.hidden_axis))(x), BTF)
    h = checkpoint_name(nn.silu(gate) * up, "mlp_hidden")
    return constrain(proj("down", self.out_features, (self.hidden_axis, self.out_axis))(h), BTD)


class MultiHeadAttention(nn.Module):
  """Bidirectional multi-head attention with biased q/k/v/o projections (ViT and pooling).

  inputs_q [B, T, Dq], inputs_kv [B, S, Dkv] -> [B, T, out_features].
  """

  num_heads: int
  head_dim: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  in_axis: str = "vit_embed"
  out_axis: str = "vit_embed"
  heads_axis: str = "vit_heads"

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array) -> Array:
    def proj(name):
      return DenseGeneral((self.num_heads, self.head_dim), (self.in_axis, self.heads_axis, "head_dim"),
                          use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    inputs_q, inputs_kv = constrain(inputs_q, BTD), constrain(inputs_kv, BTD)
    q = constrain(proj("query")(inputs_q), BTNH)
    k = constrain(proj("key")(inputs_kv), BTNH)
    v = constrain(proj("value")(inputs_kv), BTNH)
    out = constrain(dot_product_attention(q, k, v, mask=None), BTNH)
    out = DenseGeneral(self.out_features, (self.heads_axis, "head_dim", self.out_axis), contract=2,
                       use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)
    return constrain(out, BTD)


class DecoderAttention(nn.Module):
  """Causal GQA self-attention of the LLM: optional qkv bias, full-width qk RMSNorm, RoPE, KV cache.

  x [B, T, D], positions [B, T], mask [B, T, S].
  With a cache (key/value [B, K, S, h], heads-major: attention reads it without a transpose)
  the new keys/values are written from slot `cache_index` and attention runs over all S slots;
  without one S == T.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, cache: dict | None = None,
               cache_index: Array | None = None) -> tuple[Array, dict | None]:
    b, t, _ = x.shape

    def proj(name, heads, heads_axis):
      return DenseGeneral((heads, self.head_dim), ("embed", heads_axis, "head_dim"),
                          use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)

    x = constrain(x, BTD)
    q = checkpoint_name(proj("query", self.num_heads, "heads")(x), "query_proj")
    k = checkpoint_name(proj("key", self.num_kv_heads, "kv_heads")(x), "key_proj")
    v = checkpoint_name(proj("value", self.num_kv_heads, "kv_heads")(x), "value_proj")
    if self.qk_norm:
      # Normalised over the whole projection width, before the head split (as the reference's olmo/model.py does).
      norm = lambda name: RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=name)
      q = norm("q_norm")(q.reshape(b, t, -1)).reshape(q.shape)
      k = norm("k_norm")(k.reshape(b, t, -1)).reshape(k.shape)
    cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = constrain(q, BTNH), constrain(k, BTKH), constrain(v, BTKH)

    new_cache = None
    if cache is not None:
      start = (0, 0, cache_index, 0)
      write = lambda c, x: jax.lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).astype(c.dtype),
                                                        start)
      k, v = write(cache["key"], k), write(cache["value"], v)
      new_cache = {"key": k, "value": v}
    out = dot_product_attention(q, k, v, mask, kv_heads_major=cache is not None)
    out = constrain(out, BTNH)
    out = DenseGeneral(x.shape[-1], ("heads", "head_dim", "embed"), contract=2, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="out")(out)
    return checkpoint_name(constrain(out, BTD), "out_proj"), new_cache


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "minimal": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj", "mlp_hidden"),
}


def maybe_remat(module_cls, policy: str, static_argnums: tuple[int, ...] = ()):
  """Wraps a block class in nn.remat with a named policy ('none' = no rematerialisation)."""
  if policy == "none":
    return module_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {policy!r} unknown; expected none or one of {sorted(REMAT_POLICIES)}")
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=False,
                  static_argnums=static_argnums)


def scan_unroll_steps(unroll: int, num_layers: int) -> int:
  """`MolmoConfig.scan_unroll` as lax.scan's `unroll`: 1..num_layers (values above are clipped)."""
  if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 1:
    raise ValueError(f"scan_unroll: expected an integer >= 1 (layers per scan iteration), got {unroll!r}")
  return min(unroll, max(num_layers, 1))
