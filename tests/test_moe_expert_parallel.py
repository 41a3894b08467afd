"""Expert-parallel dropless MoE (shard_map + all-to-all) against the single-device dropless path.

Legend: B batch rows, T tokens per row, N = B*T tokens, D width, E experts, k experts per token,
F expert MLP width, L layers.

On a mesh whose `expert` axis is > 1 the "ragged" layer runs `moe.expert_parallel_experts`: the
numbers must equal `moe.ragged_experts` on one device (outputs and gradients to 1e-5), also when
the routing is as uneven as it gets (every token to the same experts, all on one shard), and the
compiled program must move tokens (all-to-all) instead of gathering the expert weights.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax import sharding
from molmo_jax.models import moe
from molmo_jax.models.molmo import Molmo
from model_helpers import random_params

TOL = 1e-5
B, T = 8, 12
MESHES = [pytest.param(dict(data=2, expert=4), id="data2-expert4"),
          pytest.param(dict(data=1, fsdp=2, expert=2, tensor=2), id="fsdp2-expert2-tensor2")]


def layer_setup(num_experts=8, top_k=2, skew=False, seed=0):
  cfg = C.tiny("olmoe", num_experts=num_experts, experts_per_token=top_k).llm
  e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim
  rng = np.random.default_rng(seed)
  params = {"router": 0.3 * rng.standard_normal((d, e)),
            "gate": 0.15 * rng.standard_normal((e, d, f)),
            "up": 0.15 * rng.standard_normal((e, d, f)),
            "down": 0.15 * rng.standard_normal((e, f, d))}
  x = rng.standard_normal((B, T, d))
  if skew:
    # Every token's top-k is experts 0..k-1 (all on the first expert shard): a shared positive
    # component of x times a router row that ranks the experts 0 > 1 > ... > E-1, the rest of
    # the router too small to reorder them.
    x[..., 0] = 3.0 + np.abs(x[..., 0])
    params["router"] *= 0.1
    params["router"][0] = np.linspace(12.0, 0.0, e)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  return cfg, params, jnp.asarray(x, jnp.float32)


def layer_loss(cfg):
  probe = None

  def loss(params, x):
    nonlocal probe
    y, aux = moe.MoEBlock(cfg).apply({"params": params}, x)
    if probe is None:
      probe = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    return jnp.mean(y * probe) + aux["moe_load_balance"], y

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def assert_trees_close(a, b, tol=TOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


@pytest.mark.parametrize("skew", [False, True], ids=["random-routing", "all-to-one-shard"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_layer_equals_single_device_dropless(mesh_shape, skew):
  cfg, params, x = layer_setup(skew=skew)
  grad_fn = layer_loss(cfg)
  (loss_ref, y_ref), grads_ref = jax.jit(grad_fn)(params, x)
  mesh = sharding.make_mesh(**mesh_shape)
  with sharding.activate(mesh):
    assert moe.expert_parallel_plan(B * T, cfg.num_experts) is not None
    (loss, y), grads = jax.jit(grad_fn)(params, x)
  if skew:
    _, experts = jax.lax.top_k(x.reshape(-1, x.shape[-1]) @ params["router"], cfg.experts_per_token)
    assert set(np.unique(np.asarray(experts))) == set(range(cfg.experts_per_token))
  assert np.abs(np.asarray(y_ref)).max() > 0.1
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=TOL, rtol=0)
  np.testing.assert_allclose(float(loss), float(loss_ref), atol=TOL, rtol=0)
  assert_trees_close(grads, grads_ref)
  assert all(np.abs(np.asarray(g)).max() > 1e-4 for g in jax.tree.leaves(grads[0]))


def test_transports_agree_and_renormalised_routing_matches():
  """The fixed-size all_to_all is what CPU runs; forcing it equals the GSPMD-partitioned path,
  with the optional top-k renormalisation switched on too."""
  cfg, params, x = layer_setup(num_experts=12, top_k=3, seed=3)
  cfg_norm = C.tiny("olmoe", num_experts=12, experts_per_token=3, moe_normalize_topk=True).llm
  mesh = sharding.make_mesh(data=1, fsdp=2, expert=4)
  outputs = {}
  with sharding.activate(mesh):
    for choice in ("all_to_all", "gspmd"):
      c = C.tiny("olmoe", num_experts=12, experts_per_token=3, moe_normalize_topk=True,
                 moe_expert_parallel=choice).llm
      outputs[choice] = jax.jit(layer_loss(c))(params, x)
  (_, y_single), _ = jax.jit(layer_loss(cfg_norm))(params, x)
  np.testing.assert_allclose(np.asarray(outputs["all_to_all"][0][1]), np.asarray(y_single), atol=TOL)
  assert_trees_close(outputs["all_to_all"], outputs["gspmd"])
  del cfg


def test_plan_falls_back_where_expert_parallelism_does_not_apply():
  assert moe.expert_parallel_plan(96, 8) is None                       # no mesh
  with sharding.activate(sharding.make_mesh(data=8)):
    assert moe.expert_parallel_plan(96, 8) is None                     # expert axis of 1
  with sharding.activate(sharding.make_mesh(data=2, expert=4)):
    assert moe.expert_parallel_plan(96, 8, "gspmd") is None
    assert moe.expert_parallel_plan(97, 8) is None                     # tokens do not split
    plan = moe.expert_parallel_plan(96, 8)
    assert plan["expert_axes"] == ("expert",) and plan["shards"] == 4
    assert plan["transport"] == "all_to_all"                            # XLA:CPU has no ragged one
    with pytest.raises(ValueError, match="moe_expert_parallel"):
      moe.expert_parallel_plan(96, 8, "bogus")


# ----------------------------------------------------------------------------------------------
# The whole model: logits and parameter gradients
# ----------------------------------------------------------------------------------------------

def model_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  p, c, q = cfg.vision.num_patches, cfg.vision.patch_dim, cfg.preprocess.pooled_per_crop
  ids = rng.integers(0, cfg.llm.vocab_size, (B, T + q))
  ids[2, -3:] = -1
  idx = np.tile(np.arange(1, 1 + q).reshape(1, 1, q), (B, 1, 1))
  return {"input_ids": jnp.asarray(ids, jnp.int32),
          "images": jnp.asarray(rng.standard_normal((B, 1, p, c)), jnp.float32),
          "image_masks": jnp.ones((B, 1, p), jnp.float32),
          "image_input_idx": jnp.asarray(idx, jnp.int32)}


def test_model_logits_and_gradients_equal_single_device():
  """Text only (the MoE is in the LLM; images add compile time only), the 3-axis mesh; the
  (data, fsdp, expert) layout runs in tests/test_train_step.py and logits with images in
  tests/test_sharded_forward.py."""
  mesh_shape = dict(data=1, fsdp=2, expert=2, tensor=2)
  cfg = C.tiny("olmoe")
  model = Molmo(cfg)
  batch = {"input_ids": model_batch(cfg)["input_ids"]}
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  params = random_params(abstract["params"], seed=1)
  probe = jnp.asarray(np.random.default_rng(5).standard_normal(
      (B, batch["input_ids"].shape[1], cfg.llm.embedding_size)), jnp.float32)

  def loss(params, batch):
    logits, out = model.apply({"params": params}, batch)
    return jnp.mean(logits * probe) + out["aux"]["moe_load_balance"], logits

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (_, logits_ref), grads_ref = jax.jit(grad_fn)(params, batch)
  mesh = sharding.make_mesh(**mesh_shape)
  with sharding.activate(mesh):
    shardings = sharding.param_shardings(abstract, mesh)["params"]
    placed = jax.device_put(params, shardings)
    batch_sh = {k: sharding.data_sharding(mesh, v.ndim) for k, v in batch.items()}
    (_, logits), grads = jax.jit(grad_fn, in_shardings=(shardings, batch_sh))(placed, batch)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), atol=TOL, rtol=0)
  assert_trees_close(grads, grads_ref)
  moe_grads = grads["llm"]["blocks"]["moe"]
  assert np.abs(np.asarray(moe_grads["down"])).max() > 1e-5


# ----------------------------------------------------------------------------------------------
# The compiled program: tokens move, expert weights do not
# ----------------------------------------------------------------------------------------------

def gathered_expert_weights(hlo: str, num_experts: int, top_k: int) -> list[str]:
  """All-gathers (sync or async start) whose result has >= 3 dims with one of them equal to E:
  an expert weight [E, D, F] / [L, E, D, F] gathered whole. E is chosen to collide with nothing."""
  found = []
  for line in hlo.splitlines():
    if not re.search(r"\ball-gather(-start)?\(", line):
      continue
    result = line.split("=", 1)[1].split("all-gather", 1)[0]
    for dims in re.findall(r"\[([\d,]+)\]", result):
      sizes = [int(s) for s in dims.split(",")]
      if len(sizes) >= 3 and num_experts in sizes:
        found.append(line.strip()[:160])
  return found


def compiled_layer_hlo(choice, mesh_shape, num_experts=12):
  cfg = C.tiny("olmoe", num_experts=num_experts, experts_per_token=2, moe_expert_parallel=choice).llm
  _, params, x = layer_setup(num_experts=num_experts)
  mesh = sharding.make_mesh(**mesh_shape)
  with sharding.activate(mesh):
    gate_sh = sharding.logical_to_sharding(jax.sharding.PartitionSpec("exp", "embed", "mlp"), mesh)
    down_sh = sharding.logical_to_sharding(jax.sharding.PartitionSpec("exp", "mlp", "embed"), mesh)
    rest = sharding.replicated(mesh)
    p_sh = {"router": rest, "gate": gate_sh, "up": gate_sh, "down": down_sh}
    x_sh = sharding.data_sharding(mesh, 3)
    return jax.jit(layer_loss(cfg), in_shardings=(p_sh, x_sh)).lower(params, x).compile().as_text()


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_cpu_hlo_has_all_to_all_and_no_expert_weight_gather(mesh_shape):
  hlo = compiled_layer_hlo("auto", mesh_shape)
  assert re.search(r"\ball-to-all(-start)?\(", hlo)
  assert gathered_expert_weights(hlo, 12, 2) == []
  # The GSPMD partitioning of the same layer has no all-to-all: it replicates the N*k rows instead.
  assert not re.search(r"\ball-to-all(-start)?\(", compiled_layer_hlo("gspmd", mesh_shape))
