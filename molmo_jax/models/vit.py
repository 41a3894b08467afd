"""CLIP-style vision transformer (the reference's olmo/image_vit.py): pre-LN, quick-GELU, CLS token, learned positions.

Legend: B crops, P patches per crop, S = P + 1 (CLS), C patch values (p*p*3), D width,
L blocks, K selected layers.

Patches arrive flattened in (dy, dx, c) order, so the patch embedding is a plain matmul.
The tower returns the outputs of the selected blocks (the reference's `vit_layers`, e.g. blocks
21 and 14 of 23), in the configured order. CLIP's post-LayerNorm is not part of the model.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo_jax.config import VisionConfig
from molmo_jax.models import capture
from molmo_jax.models.layers import (BTD, BTF, DenseGeneral, LayerNorm, MultiHeadAttention, constrain,
                                     embedding_init, logical, maybe_remat, scan_unroll_steps)

Array = jax.Array

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def sincos2d_position_init(grid_size: int, with_cls: bool, temperature: float = 10_000.0) -> Callable:
  """Init for the [S, D] positional table: sin/cos of the patch row and column at D/4 frequencies.

  Row-major over the grid (the patch order of `preprocess.image`); the CLS row, if any, is zero.
  Each quarter of D holds sin(x w), cos(x w), sin(y w), cos(y w) for w = temperature^-(k / (D/4)).
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    positions, width = shape
    if width % 4:
      raise ValueError(f"vision.position_init='sincos2d' needs a width divisible by 4, got {width}")
    if positions != grid_size ** 2 + int(with_cls):
      raise ValueError(f"vision.position_init='sincos2d': {positions} positions for a {grid_size}x"
                       f"{grid_size} grid{' + CLS' if with_cls else ''}")
    y, x = jnp.mgrid[:grid_size, :grid_size]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4))
    xw = x.reshape(-1)[:, None] * omega[None]
    yw = y.reshape(-1)[:, None] * omega[None]
    table = jnp.concatenate([jnp.sin(xw), jnp.cos(xw), jnp.sin(yw), jnp.cos(yw)], axis=1)
    if with_cls:
      table = jnp.concatenate([jnp.zeros((1, width)), table], axis=0)
    return table.astype(dtype)

  return init


class VitBlock(nn.Module):
  """x + Attn(LN(x)); x + MLP(LN(x)). Returns (x, x) so the scan stacks every block output."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, _: None = None) -> tuple[Array, Array]:
    cfg = self.config
    ln = lambda name: LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name=name)
    h = ln("attention_norm")(x)
    x = x + MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.width, self.dtype, self.param_dtype,
                               name="attention")(h, h)
    h = ln("ffn_norm")(x)
    dense = lambda name, features, axes: DenseGeneral(features, axes, use_bias=True, dtype=self.dtype,
                                                      param_dtype=self.param_dtype, name=name)
    h = constrain(dense("fc1", cfg.mlp_dim, ("vit_embed", "vit_mlp"))(constrain(h, BTD)), BTF)
    h = ACTIVATIONS[cfg.activation](h)
    h = constrain(dense("fc2", cfg.width, ("vit_mlp", "vit_embed"))(h), BTD)
    x = constrain(x + h, BTD)
    return x, x


class VisionTransformer(nn.Module):
  """patches [B, P, C] -> tuple of K selected block outputs, each [B, S, D] (CLS first)."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_unroll: int = 1             # blocks per scan iteration (see MolmoConfig.scan_unroll)

  @nn.compact
  def __call__(self, patches: Array) -> tuple[Array, ...]:
    cfg = self.config
    b = patches.shape[0]
    x = DenseGeneral(cfg.width, ("vit_patch", "vit_embed"), use_bias=cfg.patch_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="patch_embed")(patches)
    x = constrain(x, BTD)
    if cfg.use_cls_token:
      cls = self.param("class_embedding", logical(embedding_init(), ("vit_embed",)), (cfg.width,),
                       self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width)), x], axis=1)
    if cfg.position_init == "sincos2d":
      pos_init = sincos2d_position_init(cfg.grid_size, cfg.use_cls_token)
    else:
      pos_init = embedding_init()
    pos = self.param("positional_embedding", logical(pos_init, ("vit_positions", "vit_embed")),
                     (cfg.num_positions, cfg.width), self.param_dtype)
    if pos.shape[0] != x.shape[1]:
      raise ValueError(f"vision: {x.shape[1]} tokens per crop but {pos.shape[0]} positional embeddings; "
                       f"crops must be {cfg.image_size} px with patch {cfg.patch_size}")
    x = constrain(x + pos.astype(self.dtype)[None], BTD)
    if cfg.use_pre_ln:
      x = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name="pre_ln")(x)
    x = constrain(x, BTD)
    capture.sow(self, "vit_embeddings", x)

    block = maybe_remat(VitBlock, self.remat_policy)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                     unroll=scan_unroll_steps(self.scan_unroll, cfg.num_layers))
    _, hidden = blocks(cfg, self.dtype, self.param_dtype, name="blocks")(x, None)   # [L, B, S, D]
    selected = tuple(hidden[i] for i in cfg.resolved_layers())
    capture.sow(self, "vit_layers", hidden)
    capture.sow(self, "vit_selected", jnp.stack(selected))
    return selected
