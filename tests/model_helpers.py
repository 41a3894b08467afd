"""Helpers shared by the model-core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(abstract_params, seed: int):
  """Random parameters at a scale where every term matters: O(1) logits, live biases, norms and
  pad embeddings (zero biases and pad embeddings, as at init, would hide bugs)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape)
    elif name in ("pad_embed", "pretrained", "new", "class_embedding", "positional_embedding"):
      value = rng.standard_normal(leaf.shape)
    else:
      value = 0.15 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params))
