"""Optimizer: parameter groups, schedules, AdamW, frozen embedding, per-component clipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from molmo_jax.training import optimizer as opt_lib

# Every group of docs/architecture.md's parameter tree, tiny.
EXPECTED_GROUPS = {
    "vision/patch_embed/kernel": "vit",
    "vision/positional_embedding": "vit",
    "vision/pre_ln/scale": "vit",
    "vision/blocks/attention/query/kernel": "vit",
    "vision/blocks/mlp/fc1/bias": "vit",
    "connector/pad_embed": "connector",
    "connector/pooling/query/kernel": "connector",
    "connector/projector/down/kernel": "connector",
    "llm/embedding/pretrained": "frozen",
    "llm/embedding/new": "connector",
    "llm/blocks/attention/query/kernel": "llm",
    "llm/blocks/mlp/gate/kernel": "llm",
    "llm/blocks/attn_norm/scale": "llm",
    "llm/final_norm/scale": "llm",
    "llm/lm_head/kernel": "llm",
}
SHAPES = {
    "vision/patch_embed/kernel": (12, 4), "vision/positional_embedding": (5, 4),
    "vision/pre_ln/scale": (4,), "vision/blocks/attention/query/kernel": (2, 4, 2, 2),
    "vision/blocks/mlp/fc1/bias": (2, 6), "connector/pad_embed": (2, 8),
    "connector/pooling/query/kernel": (8, 2, 2), "connector/projector/down/kernel": (6, 4),
    "llm/embedding/pretrained": (10, 4), "llm/embedding/new": (3, 4),
    "llm/blocks/attention/query/kernel": (2, 4, 2, 2), "llm/blocks/mlp/gate/kernel": (2, 4, 6),
    "llm/blocks/attn_norm/scale": (2, 4), "llm/final_norm/scale": (4,),
    "llm/lm_head/kernel": (4, 10),
}


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flat(tree):
  return {opt_lib.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return _nest({n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in SHAPES.items()})


def _config(**overrides):
  base = dict(total_steps=100,
              connector=opt_lib.ComponentSchedule(2e-4, 4),
              vit=opt_lib.ComponentSchedule(6e-6, 10),
              llm=opt_lib.ComponentSchedule(2e-5, 0))
  base.update(overrides)
  return opt_lib.OptimizerConfig(**base)


def test_param_groups_follow_the_table():
  labels = _flat(opt_lib.param_groups(_params()))
  assert labels == EXPECTED_GROUPS


def test_frozen_patterns_are_configurable():
  train_all = _flat(opt_lib.param_groups(_params(), frozen_patterns=()))
  assert train_all["llm/embedding/pretrained"] == "llm"
  freeze_vit = _flat(opt_lib.param_groups(
      _params(), frozen_patterns=opt_lib.DEFAULT_FROZEN_PATTERNS + (r"^vision/",)))
  assert {n for n, g in freeze_vit.items() if g == "frozen"} == (
      {n for n in SHAPES if n.startswith("vision/")} | {"llm/embedding/pretrained"})


def test_parameter_outside_every_group_is_an_error():
  with pytest.raises(ValueError, match="decoder/wte"):
    opt_lib.param_groups({"decoder": {"wte": jnp.zeros(2)}})


@pytest.mark.parametrize("count, expected_fraction", [
    (0, 1 / 10),                                                   # step 1: lr / warmup
    (4, 5 / 10),
    (9, 1.0),                                                      # end of warmup
    (54, 0.1 + 0.9 * (1 + math.cos(math.pi * 45 / 90)) / 2),       # mid-cosine (= 0.55)
    (77, 0.1 + 0.9 * (1 + math.cos(math.pi * 68 / 90)) / 2),
    (99, 0.1),                                                     # last step: alpha_f * lr
    (150, 0.1),                                                    # stays at the floor after
])
def test_schedule_matches_the_reference_formula(count, expected_fraction):
  schedule = opt_lib.make_schedule(3e-4, warmup=10, total_steps=100, alpha_f=0.1)
  np.testing.assert_allclose(schedule(count), 3e-4 * expected_fraction, rtol=1e-6)


def test_schedule_rejects_warmup_covering_every_step():
  with pytest.raises(ValueError, match="warmup_steps"):
    opt_lib.make_schedule(1e-3, warmup=100, total_steps=100)


def test_first_update_uses_each_components_step_one_lr():
  params = _params()
  tx = opt_lib.build_optimizer(_config(), params)
  state = tx.tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)   # under every clip threshold
  updates, _ = jax.jit(tx.tx.update)(grads, state, params)
  # Adam's first step is lr * g/|g| = lr per coordinate (eps 1e-6 << 1e-3).
  lrs = {"connector": 2e-4 / 4, "vit": 6e-6 / 10, "llm": 2e-5 * (0.1 + 0.9 * (1 + math.cos(
      math.pi / 100)) / 2), "frozen": 0.0}
  for name, update in _flat(updates).items():
    np.testing.assert_allclose(-np.asarray(update), lrs[EXPECTED_GROUPS[name]], rtol=2e-3,
                               err_msg=name)
  np.testing.assert_allclose(tx.current_learning_rates(0)["connector"], 2e-4 / 4, rtol=1e-6)
  assert set(tx.current_learning_rates(0)) == {"connector", "vit", "llm"}


def _reference_adamw(p, grads, lr_fn, b1=0.9, b2=0.95, eps=1e-6, wd=0.0):
  """torch.optim.AdamW, one parameter, in float64."""
  p, m, v = np.asarray(p, np.float64), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    lr = lr_fn(t)
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_semantics(weight_decay):
  params = _params(1)
  tx = opt_lib.build_optimizer(_config(weight_decay=weight_decay, max_grad_norm=None), params)
  state = tx.tx.init(params)
  update = jax.jit(tx.tx.update)
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32),
                            params) for _ in range(3)]
  current = params
  for grads in grads_seq:
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
  for name, group, decayed in [("llm/blocks/mlp/gate/kernel", "llm", True),
                               ("vision/patch_embed/kernel", "vit", True),
                               ("llm/final_norm/scale", "llm", False),
                               ("llm/embedding/new", "connector", False)]:
    sched = tx.schedules[group]
    expected = _reference_adamw(_flat(params)[name], [_flat(g)[name] for g in grads_seq],
                                lambda t: float(sched(t - 1)),
                                wd=weight_decay if decayed else 0.0)
    np.testing.assert_allclose(_flat(current)[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_frozen_embedding_is_bit_identical_and_holds_no_adam_state():
  params = _params(2)
  # -0.0 is the value a "+ 0.0" update would silently turn into +0.0.
  table = params["llm"]["embedding"]["pretrained"]
  params["llm"]["embedding"]["pretrained"] = table.at[0, 0].set(-0.0)
  before = np.asarray(params["llm"]["embedding"]["pretrained"]).copy()
  tx = opt_lib.build_optimizer(_config(), params)
  state = tx.tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
      *tx.tx.update(g, s, p)))
  for i in range(3):
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5 + i), params)
    params, state = step(params, state, grads)
  after = np.asarray(params["llm"]["embedding"]["pretrained"])
  np.testing.assert_array_equal(after.view(np.uint32), before.view(np.uint32))
  assert not np.array_equal(np.asarray(params["llm"]["embedding"]["new"]),
                            np.asarray(_params(2)["llm"]["embedding"]["new"]))
  # No optimizer-state leaf has the table's shape: Adam moments exist only for trained params.
  table_shape = SHAPES["llm/embedding/pretrained"]
  assert all(np.shape(x) != table_shape for x in jax.tree.leaves(state))


def _scaled_grads(params, norms):
  """Gradients whose component norms are exactly `norms`."""
  labels = opt_lib.param_groups(params)
  raw = jax.tree.map(lambda p: jnp.ones_like(p), params)
  counts = {c: sum(x.size for x, l in zip(jax.tree.leaves(raw), jax.tree.leaves(labels)) if l == c)
            for c in norms}
  return jax.tree.map(lambda g, l: g * norms[l] / math.sqrt(counts[l]) if l in norms else g * 7.0,
                      raw, labels), labels


def _component_norms(tree, labels):
  return {c: float(opt_lib._component_norm(tree, labels, c)) for c in opt_lib.COMPONENTS}


def test_each_component_is_clipped_to_its_own_norm():
  params = _params()
  norms = {"connector": 5.0, "vit": 0.3, "llm": 2.0}
  grads, labels = _scaled_grads(params, norms)
  clip = opt_lib.clip_by_component_norm(labels, max_norm=1.0)
  clipped, state = jax.jit(clip.update)(grads, clip.init(params))
  after = _component_norms(clipped, labels)
  for c, n in norms.items():
    np.testing.assert_allclose(after[c], min(n, 1.0), rtol=1e-5)
    np.testing.assert_allclose(state.grad_norms[c], n, rtol=1e-5)
  # A single global-norm clip would have scaled the small ViT gradient too.
  assert after["vit"] == pytest.approx(0.3, rel=1e-5)
  frozen = _flat(clipped)["llm/embedding/pretrained"]
  np.testing.assert_array_equal(frozen, 7.0)          # frozen grads neither clipped nor counted


def test_pre_clip_norms_are_readable_from_the_optimizer_state():
  params = _params()
  grads, _ = _scaled_grads(params, {"connector": 3.0, "vit": 0.5, "llm": 1.5})
  tx = opt_lib.build_optimizer(_config(), params)
  _, state = jax.jit(tx.tx.update)(grads, tx.tx.init(params), params)
  norms = tx.grad_norms(state)
  np.testing.assert_allclose([norms["connector"], norms["vit"], norms["llm"]], [3.0, 0.5, 1.5],
                             rtol=1e-5)
  # Also found through an optax wrapper (e.g. gradient accumulation).
  wrapped = optax.MultiSteps(tx.tx, every_k_schedule=2)
  found = opt_lib.component_grad_norms(wrapped.init(params))
  assert set(found) == {"connector", "vit", "llm"} and all(v == 0 for v in found.values())


def test_config_from_config_dict_and_unknown_fields():
  cfg = ml_collections.ConfigDict(dict(total_steps=50, connector=dict(learning_rate=1e-3,
                                                                      warmup_steps=5),
                                       vit=dict(learning_rate=1e-5, warmup_steps=5),
                                       llm=dict(learning_rate=1e-4, warmup_steps=5),
                                       frozen_patterns=[]))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  tx = opt_lib.build_optimizer(cfg, shapes)   # shapes suffice
  assert tx.config.connector == opt_lib.ComponentSchedule(1e-3, 5)
  assert _flat(tx.labels)["llm/embedding/pretrained"] == "llm"
  with pytest.raises(ValueError, match="learning_rat"):
    opt_lib.OptimizerConfig.from_mapping({"total_steps": 10, "learning_rat": 1.0})
  with pytest.raises(ValueError, match="max_grad_norm"):
    _config(max_grad_norm=0.0)
