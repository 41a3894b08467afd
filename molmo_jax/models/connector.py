"""Vision-language connector (the reference's olmo/model.py (vision backbone: pooling and projector)): ViT features -> one d_model vector per pooled cell.

Legend: B crops, P patches per crop (g x g grid), C concatenated ViT width (K layers x Dv),
Q pooled cells per crop, W patches per pooling window (2x2 = 4), Dv pooled width, D LLM width.

Steps per crop: concat the selected ViT layers and drop CLS -> zero absent crops -> add the
pad / partial-pad embeddings -> 2x2 attention pooling whose query is the window mean ->
SwiGLU projector.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo_jax.config import ConnectorConfig, VisionConfig
from molmo_jax.models import capture
from molmo_jax.models.layers import MultiHeadAttention, SwiGLU, constrain, logical

Array = jax.Array


def add_padding_embeddings(features: Array, masks: Array, pad_embed: Array) -> Array:
  """features [B, P, C] + pad_embed[0] where mask == 0, + pad_embed[1] where mask < 1 otherwise.

  Mask values are fractions of real pixels per patch; -1 (collator padding, and the whole last
  crop under the released off-by-one pairing) counts as partial padding.
  """
  all_pad = (masks == 0).astype(features.dtype)[..., None]
  partial = ((masks < 1) & (masks != 0)).astype(features.dtype)[..., None]
  pad_embed = pad_embed.astype(features.dtype)
  return features + all_pad * pad_embed[0] + partial * pad_embed[1]


def pooling_windows(features: Array, grid: int, pool_h: int, pool_w: int) -> Array:
  """[B, g*g, C] -> [B, Q, W, C]: row-major windows of pool_h x pool_w patches.

  A grid that does not divide evenly is zero-padded at the bottom/right first (as the reference
  does for SigLIP's 27x27 grid).
  """
  b, p, c = features.shape
  x = features.reshape(b, grid, grid, c)
  pad_h, pad_w = (-grid) % pool_h, (-grid) % pool_w
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  gh, gw = x.shape[1] // pool_h, x.shape[2] // pool_w
  x = x.reshape(b, gh, pool_h, gw, pool_w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, pool_h * pool_w, c)


class Connector(nn.Module):
  """selected ViT layers (K x [B, S, Dv]), masks [B, P], present [B] -> [B, Q, D]."""

  vision: VisionConfig
  config: ConnectorConfig
  d_model: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, layer_features: tuple[Array, ...], masks: Array, present: Array) -> Array:
    cfg, vis = self.config, self.vision
    x = jnp.concatenate(layer_features, axis=-1)
    if vis.use_cls_token:
      x = x[:, 1:]
    x = x * present.astype(x.dtype)[:, None, None]
    if cfg.padding_embed == "pad_and_partial_pad":
      pad_embed = self.param("pad_embed", logical(nn.initializers.zeros, ("pad_kinds", "vit_concat")),
                             (2, x.shape[-1]), self.param_dtype)
      x = add_padding_embeddings(x, masks, pad_embed)
    elif cfg.padding_embed != "none":
      raise ValueError(f"connector.padding_embed {cfg.padding_embed!r} unknown")

    if cfg.pooling == "attention_meanq":
      windows = pooling_windows(x, vis.grid_size, cfg.pool_height, cfg.pool_width)   # [B, Q, W, C]
      b, q, w, c = windows.shape
      windows = windows.reshape(b * q, w, c)
      query = jnp.mean(windows, axis=1, keepdims=True)
      pooled = MultiHeadAttention(cfg.pool_heads, cfg.pool_head_dim, vis.width, self.dtype,
                                  self.param_dtype, in_axis="vit_concat", out_axis="vit_embed",
                                  heads_axis="vit_heads", name="pooling")(query, windows)
      x = pooled.reshape(b, q, vis.width)
    elif cfg.pooling != "none":
      raise ValueError(f"connector.pooling {cfg.pooling!r} unknown")

    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    capture.sow(self, "image_pooled", x)
    return SwiGLU(cfg.projector_hidden, self.d_model, self.dtype, self.param_dtype,
                  in_axis="vit_embed", hidden_axis="mlp", out_axis="embed", name="projector")(x)
