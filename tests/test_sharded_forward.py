"""The full forward under 8-device meshes equals the single-device forward (the reference's olmo/model.py (forward pass) + sharding.py).

Legend: B batch (8, so every batch-sharding mesh axis divides it), T text length, N crops,
P patches, C patch values, Q pooled cells per crop, V logits width, L layers, E experts,
D width, F expert MLP width.

Parameters take their layout from `sharding.param_shardings` (THE logical-axis rule table) and the
batch is split over the activation_batch axes; the logits must match to 1e-5 and the parameters
must really be split (a silently replicated run would also match).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from molmo_jax import config as C
from molmo_jax import sharding
from molmo_jax.models.molmo import Molmo

TOL = 1e-5
B, T, CROPS = 8, 24, 1


from model_helpers import random_params  # noqa: E402


def make_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  p, c, q = cfg.vision.num_patches, cfg.vision.patch_dim, cfg.preprocess.pooled_per_crop
  ids = rng.integers(0, cfg.llm.vocab_size, (B, T))
  ids[3, T - 4:] = -1
  images = rng.standard_normal((B, CROPS, p, c))
  images[5] = -1.0                                              # a row whose only crop is absent
  idx = np.tile(np.arange(1, 1 + q).reshape(1, CROPS, q), (B, 1, 1))
  idx[5] = -1
  return {"input_ids": jnp.asarray(ids, jnp.int32), "images": jnp.asarray(images, jnp.float32),
          "image_masks": jnp.asarray(rng.choice([0.0, 0.3, 1.0], size=(B, CROPS, p)), jnp.float32),
          "image_input_idx": jnp.asarray(idx, jnp.int32)}


@functools.lru_cache(maxsize=None)
def model_setup(family, moe_impl=None):
  cfg = C.tiny(family) if moe_impl is None else C.tiny(family, moe_impl=moe_impl)
  model = Molmo(cfg)
  batch = make_batch(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  params = random_params(abstract["params"], seed=1)
  apply = lambda params, batch: model.apply({"params": params}, batch)[0]
  single = np.asarray(jax.jit(apply)(params, batch))
  return abstract, params, batch, apply, single


def sharded_logits(family, moe_impl, mesh_shape):
  abstract, params, batch, apply, _ = model_setup(family, moe_impl)
  mesh = sharding.make_mesh(**mesh_shape)
  with sharding.activate(mesh):
    param_shardings = sharding.param_shardings(abstract, mesh)["params"]
    batch_shardings = {k: sharding.data_sharding(mesh, v.ndim) for k, v in batch.items()}
    logits_sharding = sharding.logical_to_sharding(
        PartitionSpec("activation_batch", "activation_length", "activation_vocab"), mesh)
    placed = jax.device_put(params, param_shardings)
    forward = jax.jit(apply, in_shardings=(param_shardings, batch_shardings),
                      out_shardings=logits_sharding)
    logits = forward(placed, batch)
  return placed, logits


def shard_shape(array):
  return array.sharding.shard_shape(array.shape)


CASES = [
    pytest.param("qwen2", None, dict(data=8), id="qwen2-data8"),
    pytest.param("qwen2", None, dict(data=1, fsdp=2, tensor=2, expert=2), id="qwen2-fsdp2-tensor2-expert2"),
    pytest.param("olmoe", "ragged", dict(data=1, fsdp=2, tensor=2, expert=2),
                 id="olmoe-ragged-fsdp2-tensor2-expert2"),
    pytest.param("olmoe", "capacity", dict(data=1, fsdp=2, tensor=2, expert=2),
                 id="olmoe-capacity-fsdp2-tensor2-expert2"),
    pytest.param("qwen2", None, dict(data=1, fsdp=4, tensor=2), id="qwen2-fsdp4-tensor2"),
]


@pytest.mark.parametrize("family,moe_impl,mesh_shape", CASES)
def test_sharded_logits_equal_single_device(family, moe_impl, mesh_shape):
  assert len(jax.devices()) == 8
  placed, logits = sharded_logits(family, moe_impl, mesh_shape)
  single = model_setup(family, moe_impl)[-1]
  np.testing.assert_allclose(np.asarray(logits), single, atol=TOL, rtol=0)
  assert np.abs(single).max() > 1.0

  batch_ways = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("expert", 1)
  vocab_ways = mesh_shape.get("tensor", 1)
  assert shard_shape(logits) == (B // batch_ways, T, logits.shape[2] // vocab_ways)

  fsdp, tensor, expert = (mesh_shape.get(k, 1) for k in ("fsdp", "tensor", "expert"))
  llm = placed["llm"]
  query = llm["blocks"]["attention"]["query"]["kernel"]                        # [L, D, H, h]
  l, d, h, hd = query.shape
  # Weights without an expert dimension shard their embed axis over fsdp x expert.
  assert shard_shape(query) == (l, d // (fsdp * expert), h // tensor, hd)
  assert shard_shape(llm["lm_head"]) == (d // (fsdp * expert), llm["lm_head"].shape[1] // tensor)
  pooling = placed["connector"]["pooling"]["query"]["kernel"]                  # [2Dv, Hp, hp]
  assert shard_shape(pooling) == (pooling.shape[0] // (fsdp * expert), pooling.shape[1] // tensor,
                                  pooling.shape[2])
  if family == "olmoe":
    gate = llm["blocks"]["moe"]["gate"]                                        # [L, E, D, F]
    l, e, d, f = gate.shape
    assert gate.sharding.spec == PartitionSpec(None, "expert", "fsdp", "tensor")
    assert shard_shape(gate) == (l, e // expert, d // fsdp, f // tensor)


def test_param_shardings_replicate_a_dimension_its_mesh_axes_do_not_divide():
  """jit refuses uneven argument shardings: 2 KV heads over tensor=4 stay whole, 8 heads split,
  and an ("fsdp", "expert") dimension keeps the axes that divide it."""
  mesh = sharding.make_mesh(devices=jax.devices()[:8], data=1, fsdp=2, tensor=4)
  leaf = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  boxed = {"k": nn.Partitioned(leaf((2, 16)), names=("kv_heads", "head_dim")),
           "q": nn.Partitioned(leaf((8, 16)), names=("heads", "head_dim")),
           "odd_embed": nn.Partitioned(leaf((3, 8)), names=("embed", "mlp"))}
  shardings = sharding.param_shardings(boxed, mesh)
  shards = {k: s.shard_shape(boxed[k].value.shape) for k, s in shardings.items()}
  assert shards == {"k": (2, 16), "q": (2, 16), "odd_embed": (3, 2)}
  assert "fsdp" not in str(shardings["odd_embed"].spec)
