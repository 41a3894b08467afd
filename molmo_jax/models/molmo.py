"""Molmo: where the image features enter the text (the reference's olmo/data/model_preprocessor.py (image_input_idx); olmo/model.py (forward pass)).

Legend: B batch, T text length, N crops per example (max_crops + 1), P patches per crop,
C patch values, Q pooled cells per crop, D LLM width, S key length (T or the KV-cache length).

  ids [B, T] --embed--> x [B, T, D]
  images [B, N, P, C] --ViT--> selected layers --connector--> features [B, N*Q, D]
  x[b, image_input_idx[b, j]] += features[b, j]   for every image_input_idx >= 0
  x --decoder--> logits [B, T, V_emb]

The feature is ADDED to the <im_patch> token's embedding (not substituted). A crop whose values
are all -1 is collator padding: its features are zeroed and its indices are negative anyway.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo_jax.config import MolmoConfig
from molmo_jax.models import capture as capture_lib
from molmo_jax.models.connector import Connector
from molmo_jax.models.decoder import Decoder
from molmo_jax.models.layers import causal_segment_mask, constrain
from molmo_jax.models.vit import VisionTransformer

Array = jax.Array


def default_positions(input_ids: Array) -> Array:
  """max(cumsum(valid) - 1, 0): padding (-1) repeats the previous position."""
  valid = (input_ids != -1).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def text_attention_mask(input_ids: Array, subsegment_ids: Array | None = None,
                        segment_ids: Array | None = None) -> Array:
  """Causal mask [B, T, T] over non-padding keys, with the packed-conversation rule if given.

  segment_ids [B, T] (rows packed with several examples, data/packing.py): a token attends only
  to tokens of its own segment (block-diagonal), so packed examples never see each other.
  """
  b, t = input_ids.shape
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = subsegment_ids if subsegment_ids is not None else jnp.zeros((b, t), jnp.int32)
  mask = causal_segment_mask(segments, segments, input_ids != -1, slots, slots)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def insert_image_features(x: Array, features: Array, image_input_idx: Array) -> Array:
  """x [B, T, D] + features [B, F, D] at positions image_input_idx [B, F]; negatives are skipped."""
  b, t, _ = x.shape
  valid = image_input_idx >= 0
  # Out-of-range positions are dropped by the scatter: invalid slots point past the end.
  idx = jnp.where(valid, image_input_idx, t)
  features = features * valid[..., None].astype(features.dtype)
  rows = jnp.arange(b)[:, None]
  return x.at[rows, idx].add(features.astype(x.dtype), mode="drop")


class Molmo(nn.Module):
  """The full model. `__call__(batch)` -> (logits [B, T, V_emb] float32, out).

  `apply(variables, batch, capture=("vit", "connector", "decoder", "router") or "all")` also
  returns the requested intermediates in out["captured"] (see molmo_jax.models.capture).
  """

  config: MolmoConfig

  def apply(self, variables: Any, *args: Any, capture: Any = None, **kwargs: Any) -> Any:
    """nn.Module.apply, plus `capture`: groups of intermediates to return in out["captured"]
    (nothing is computed or stored for groups not asked for)."""
    groups = capture_lib.resolve(capture)
    if not groups:
      return super().apply(variables, *args, **kwargs)
    if kwargs.get("mutable") or kwargs.get("method") not in (None, "__call__"):
      raise ValueError("Molmo.apply: capture works with the plain forward pass only (no "
                       "mutable=, no method=)")
    kwargs.pop("mutable", None)
    (logits, out), state = super().apply(
        variables, *args, mutable=[capture_lib.collection(g) for g in groups], **kwargs)
    return logits, {**out, "captured": capture_lib.collect(state, groups)}

  def setup(self):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.vision = VisionTransformer(cfg.vision, dtype, param_dtype, cfg.remat_policy, cfg.scan_unroll)
    self.connector = Connector(cfg.vision, cfg.connector, cfg.llm.d_model, dtype, param_dtype)
    self.llm = Decoder(cfg.llm, dtype, param_dtype, cfg.remat_policy, cfg.scan_unroll)

  def encode_images(self, images: Array, image_masks: Array) -> Array:
    """images [B, N, P, C], image_masks [B, N, P] -> features [B, N*Q, D]."""
    b, n, p, c = images.shape
    flat = images.reshape(b * n, p, c)
    present = jnp.any(flat != -1, axis=(1, 2))
    flat = constrain(flat, ("activation_batch", "activation_length", None))
    layers = self.vision(flat)
    features = self.connector(layers, image_masks.reshape(b * n, p), present)      # [B*N, Q, D]
    features = features.reshape(b, n * features.shape[1], features.shape[2])
    capture_lib.sow(self, "image_features", features)
    return constrain(features, ("activation_batch", "activation_length", "activation_embed"))

  def embed_inputs(self, batch: Mapping[str, Array], image_features: Array | None = None) -> Array:
    """Token embeddings with the image features added: [B, T, D]."""
    input_ids = batch["input_ids"]
    x = self.llm.embed(jnp.where(input_ids != -1, input_ids, 0))
    if image_features is None and batch.get("images") is not None:
      image_features = self.encode_images(batch["images"], batch["image_masks"])
    if image_features is not None:
      idx = batch["image_input_idx"].reshape(input_ids.shape[0], -1)
      x = insert_image_features(x, image_features, idx)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, batch: Mapping[str, Array], *, cache: dict | None = None,
               cache_index: Array | None = None, attention_mask: Array | None = None,
               image_features: Array | None = None, compute_logits: bool = True
               ) -> tuple[Array | None, dict[str, Any]]:
    """Forward pass.

    batch: input_ids [B, T] (-1 = padding) and optionally images, image_masks, image_input_idx,
      position_ids, subsegment_ids, segment_ids (examples packed into one row, attending only
      within their segment), response_mask (answer tokens, for response-only dropout).
    cache / cache_index: KV cache (see decoder.init_cache) for generation; the caller then also
      passes attention_mask [B, T, S] and position_ids.
    image_features: precomputed [B, N*Q, D] (skips the vision tower).
    compute_logits: False returns None for the logits, out["hidden"] [B, T, D] being what the
      chunked training loss needs (the [B, T, V_emb] fp32 logits are never built).
    """
    input_ids = batch["input_ids"]
    x = self.embed_inputs(batch, image_features)
    positions = batch.get("position_ids")
    if positions is None:
      positions = default_positions(input_ids)
    if attention_mask is None:
      if cache is not None:
        raise ValueError("Molmo: a KV cache needs an explicit attention_mask [B, T, S]")
      attention_mask = text_attention_mask(input_ids, batch.get("subsegment_ids"),
                                           batch.get("segment_ids"))
    logits, out = self.llm(x, positions, attention_mask, cache, cache_index, batch.get("response_mask"),
                           compute_logits)
    return logits, out

  def decode_with_layer_slices(self, input_ids: Array, positions: Array, mask: Array,
                               layers: tuple, caches: tuple, cache_index: Array,
                               lm_head_t: Array | None = None) -> tuple[Array, tuple]:
    """A text-only forward from per-layer decoder parameters (Decoder.run_layer_slices), for
    generation's decode steps: input_ids [B, T] (>= 0), positions [B, T], mask [B, T, S],
    caches L dicts key/value [B, K, S, h] -> (logits [B, T, V_emb] float32, caches).
    lm_head_t: see Decoder.lm_logits."""
    x = self.llm.embed(input_ids)
    hidden, caches = self.llm.run_layer_slices(x, positions, mask, layers, caches, cache_index)
    return self.llm.lm_logits(hidden, lm_head_t), caches

  def lm_logits(self, hidden: Array) -> Array:
    """out["hidden"] [B, T, D] -> logits [B, T, V_emb] float32 (the LM head alone: generation
    projects only the last prompt position)."""
    return self.llm.lm_logits(hidden)


def example_batch_shapes(config: MolmoConfig, batch: int = 1, length: int = 8, crops: int = 1
                         ) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract inputs with the model's crop geometry, for `jax.eval_shape(model.init, ...)`."""
  v, c = config.vision, config.connector
  pooled = -(-v.grid_size // c.pool_height) * -(-v.grid_size // c.pool_width)
  return {"input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
          "images": jax.ShapeDtypeStruct((batch, crops, v.num_patches, v.patch_dim), jnp.float32),
          "image_masks": jax.ShapeDtypeStruct((batch, crops, v.num_patches), jnp.float32),
          "image_input_idx": jax.ShapeDtypeStruct((batch, crops, pooled), jnp.int32)}


def abstract_variables(config: MolmoConfig) -> Any:
  """Boxed (nn.Partitioned) parameter shapes, without allocating anything."""
  return jax.eval_shape(Molmo(config).init, jax.random.PRNGKey(0), example_batch_shapes(config))


def abstract_params(config: MolmoConfig, mesh: jax.sharding.Mesh | None = None) -> Any:
  """ShapeDtypeStructs of the parameter tree, with NamedShardings when a mesh is given."""
  from molmo_jax import sharding
  boxed = abstract_variables(config)["params"]
  shapes = nn.unbox(boxed)
  if mesh is None:
    return shapes
  shardings = sharding.param_shardings(boxed, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)
