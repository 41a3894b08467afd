"""Decoder-only language model (the reference's olmo/model.py (decoder blocks)): Qwen2 / OLMo-7B-1024 / OLMoE blocks, scanned.

Legend: B batch, T query length, S key length (= T, or the KV-cache length), D width, L layers,
K kv heads, h head dim, V_emb rows of the pretrained table, V = V_emb + additional rows.

Pre-norm block (Qwen2, OLMoE):  x += Attn(norm(x));  x += MLP(norm(x))
Post-norm block (OLMo-7B-1024): x += norm(Attn(x));  x += norm(MLP(x))
Both end with final_norm and an untied LM head producing float32 logits over V_emb.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo_jax.config import LLMConfig
from molmo_jax.models import capture
from molmo_jax.models.layers import (DecoderAttention, RMSNorm, SwiGLU, cast_param, constrain,
                                     embedding_init, flat_dot, kernel_init, scan_unroll_steps,
                                     logical, maybe_remat)
from molmo_jax.models.moe import MoEBlock

Array = jax.Array


def _residual_dropout(module: nn.Module, y: Array, cfg: LLMConfig, response_mask: Array | None) -> Array:
  """Plain residual dropout, or dropout on answer tokens only (the captioning stage's variant).

  Active only when the caller passes a "dropout" rng (training); evaluation passes none.
  """
  if not module.has_rng("dropout"):
    return y
  if cfg.residual_dropout > 0:
    y = nn.Dropout(cfg.residual_dropout)(y, deterministic=False)
  if cfg.response_residual_dropout > 0 and response_mask is not None:
    dropped = nn.Dropout(cfg.response_residual_dropout)(y, deterministic=False)
    y = jnp.where(response_mask[..., None], dropped, y)
  return y


class DecoderBlock(nn.Module):
  """One transformer block; scanned over layers. Returns (x, (new_cache, aux))."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, response_mask: Array | None,
               cache: dict | None, cache_index: Array | None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, axis_name="norm", name=name)
    attention = DecoderAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                                 cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps, self.dtype, self.param_dtype,
                                 name="attention")
    post = cfg.norm_placement == "post"
    if cfg.norm_placement not in ("pre", "post"):
      raise ValueError(f"llm.norm_placement {cfg.norm_placement!r} unknown; expected pre or post")

    h, new_cache = attention(x if post else norm("attn_norm")(x), positions, mask, cache, cache_index)
    if post:
      h = norm("attn_norm")(h)
    x = x + _residual_dropout(self, h, cfg, response_mask)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    inner = x if post else norm("ff_norm")(x)
    aux = {"moe_load_balance": jnp.zeros((), jnp.float32), "moe_router_z": jnp.zeros((), jnp.float32)}
    if cfg.is_moe:
      h, aux = MoEBlock(cfg, self.dtype, self.param_dtype, name="moe")(inner)
    else:
      h = SwiGLU(cfg.mlp_dim, cfg.d_model, self.dtype, self.param_dtype, name="mlp")(inner)
    if post:
      h = norm("ff_norm")(h)
    x = x + _residual_dropout(self, h, cfg, response_mask)
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    capture.sow(self, "decoder_layers", x)
    return x, (new_cache, aux)


class Embedding(nn.Module):
  """Lookup over concat(pretrained [V_emb, D], new [A, D]) (the reference's olmo/tokenizer.py (special tokens); `pretrained` is frozen)."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    cfg = self.config
    pretrained = self.param("pretrained", logical(embedding_init(), ("vocab", "embed")),
                            (cfg.embedding_size, cfg.d_model), self.param_dtype)
    new = self.param("new", logical(embedding_init(), (None, "embed")),
                     (cfg.additional_vocab_size, cfg.d_model), self.param_dtype)
    table = jnp.concatenate([pretrained, new], axis=0).astype(self.dtype)
    return jnp.take(table, ids, axis=0)


class Decoder(nn.Module):
  """The language model. `embed(ids)` and `__call__(x, ...)` are separate so that image features
  can be added to the token embeddings in between."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_unroll: int = 1             # layers per scan iteration (see MolmoConfig.scan_unroll)

  def setup(self):
    cfg = self.config
    self.embedding = Embedding(cfg, self.dtype, self.param_dtype)
    block = maybe_remat(DecoderBlock, self.remat_policy)
    captured = {capture.collection(g): 0 for g in ("decoder", "router")}
    scanned = nn.scan(block, variable_axes={"params": 0, **captured},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                      unroll=scan_unroll_steps(self.scan_unroll, cfg.num_layers))
    self.blocks = scanned(cfg, self.dtype, self.param_dtype)
    self.final_norm = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, axis_name="norm")
    self.lm_head = self.param("lm_head", logical(kernel_init(), ("embed", "vocab")),
                              (cfg.d_model, cfg.embedding_size), self.param_dtype)

  def embed(self, ids: Array) -> Array:
    """ids [B, T] (>= 0) -> [B, T, D]."""
    x = self.embedding(ids)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, x: Array, positions: Array, mask: Array, cache: dict | None = None,
               cache_index: Array | None = None, response_mask: Array | None = None,
               compute_logits: bool = True) -> tuple[Array | None, dict]:
    """x [B, T, D] embeddings -> (logits [B, T, V_emb] float32, out).

    compute_logits=False returns None for the logits (the chunked training loss applies the LM
    head itself, `training/loss.py: chunked_loss_sums`, from out["hidden"]).

    positions [B, T]; mask [B, T, S] bool. out: "hidden" [B, T, D] (after final_norm), "cache"
    (stacked key/value [L, B, K, S, h] when a cache was given), "aux" (MoE auxiliary losses summed
    over layers). Dropout runs only when a "dropout" rng is supplied.
    """
    capture.sow(self, "decoder_embeddings", x)
    x, (new_cache, aux) = self.blocks(x, positions, mask, response_mask, cache, cache_index)
    hidden = constrain(self.final_norm(x), ("activation_batch", "activation_length", "activation_embed"))
    aux = jax.tree.map(jnp.sum, aux)
    if not compute_logits:
      return None, {"hidden": hidden, "cache": new_cache, "aux": aux}
    logits = self.lm_logits(hidden)
    return logits, {"hidden": hidden, "cache": new_cache, "aux": aux}

  def run_layer_slices(self, x: Array, positions: Array, mask: Array, layers: tuple,
                       caches: tuple, cache_index: Array) -> tuple[Array, tuple]:
    """The block stack of `__call__` run from per-layer parameter trees, for decoding.

    layers: L trees, tree l = this module's stacked "blocks" parameters at index l; caches: L
    dicts key/value [B, K, S, h], the new keys/values written from slot `cache_index`.
    x [B, T, D], positions [B, T], mask [B, T, S] -> (hidden [B, T, D] after final_norm, caches).
    Same blocks, same sums as the scan; inference only (no dropout, no captures, the MoE
    auxiliary losses are dropped). Separate parameter buffers matter on XLA:CPU, whose matmul
    kernels cannot read a slice of a stacked weight in place: inside a decode loop the scan
    copied every layer's weights once per token (molmo_jax/generate.py: LayerSlices).
    """
    block = DecoderBlock(self.config, self.dtype, self.param_dtype, parent=None)
    new = []
    for params, cache in zip(layers, caches, strict=True):
      x, (cache, _) = block.apply({"params": params}, x, positions, mask, None, cache, cache_index)
      new.append(cache)
    hidden = constrain(self.final_norm(x), ("activation_batch", "activation_length", "activation_embed"))
    return hidden, tuple(new)

  def lm_logits(self, hidden: Array, lm_head_t: Array | None = None) -> Array:
    """hidden [B, T, D] (after final_norm) -> logits [B, T, V_emb] float32.

    lm_head_t: optionally the LM head transposed, [V_emb, D] (a copy the caller made once, see
    molmo_jax/generate.py: LayerSlices). The logits are then computed as (W^T h^T)^T: the same
    sums, but with the vocabulary as the matmul's rows, which XLA:CPU's kernels run 1.4-1.8x
    faster than h @ W when a handful of rows (2-32) meet a large vocabulary."""
    if lm_head_t is None:
      logits = flat_dot(hidden, cast_param(self.lm_head, self.dtype), preferred_element_type=jnp.float32)
    else:
      rows = hidden.reshape(-1, hidden.shape[-1])
      logits_t = jax.lax.dot_general(cast_param(lm_head_t, self.dtype), rows, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)      # [V_emb, B*T]
      # The barrier keeps XLA from folding the transpose back into the dot's operand order.
      logits = jax.lax.optimization_barrier(logits_t).T.reshape(hidden.shape[:-1] + (-1,))
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def init_cache(config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> dict[str, Array]:
  """Empty KV cache: key/value [L, B, K, S, h] (heads-major, the layout attention reads)."""
  shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
