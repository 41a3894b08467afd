"""The sharded train step: layouts agree with one device, accumulation, learning, FLOPs, configs.

Every mesh runs the same batch from the same initial state (built once on one device and moved
into each layout's shards), so losses and updated parameters must agree to fp32 rounding.
"""

import importlib
import math

import jax
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax import sharding
from molmo_jax.models.molmo import Molmo
from molmo_jax.training import flops
from molmo_jax import experiment
from molmo_jax.training import train_step as ts
from molmo_jax.training.optimizer import ComponentSchedule, OptimizerConfig, build_optimizer

B, T = 8, 32
TOL = 1e-5


def make_batch(cfg: C.MolmoConfig, seed: int, batch: int = B, length: int = T) -> dict:
  """Two present crops per example whose features land on tokens 1..2Q; targets are a fixed
  function of the input token, so a model can learn them."""
  rng = np.random.default_rng(seed)
  spec = ts.batch_spec(cfg, batch, length)
  n, p, c = spec["images"].shape[1:]
  q = spec["image_input_idx"].shape[-1]
  ids = rng.integers(0, cfg.llm.vocab_size, (batch, length)).astype(np.int32)
  ids[1, -4:] = -1                                         # some padding
  out = {
      "input_ids": ids,
      "target_ids": np.where(ids >= 0, (ids * 7 + 3) % cfg.llm.vocab_size, -1).astype(np.int32),
      "loss_weights": np.where(ids >= 0, rng.uniform(0.5, 1.5, (batch, length)), 0).astype(np.float32),
      "subsegment_ids": np.zeros((batch, length), np.int32),
      "position_ids": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
      "images": np.full((batch, n, p, c), -1, np.float32),
      "image_masks": np.full((batch, n, p), -1, np.float32),
      "image_input_idx": np.full((batch, n, q), -1, np.int32),
  }
  out["images"][:, :2] = rng.normal(size=(batch, 2, p, c))
  out["image_masks"][:, :2] = 1.0
  out["image_input_idx"][:, 0] = np.arange(q) + 1
  out["image_input_idx"][:, 1] = np.arange(q) + 1 + q
  return out


def random_state(model, optimizer, spec) -> ts.TrainState:
  """A start state from numpy (no init compile; init_train_state runs in the train.py tests)."""
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
                       else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)),
      ts.abstract_params(model, spec))
  return jax.device_get(ts.TrainState(step=np.int32(0), params=params,
                                      opt_state=optimizer.tx.init(params),
                                      rng=np.asarray(jax.random.PRNGKey(0))))


class Setup:
  """Model, optimizer and the single-device reference step of one tiny family."""

  def __init__(self, family: str, with_images: bool = True):
    self.cfg = C.tiny(family)
    self.model = Molmo(self.cfg)
    self.batch = make_batch(self.cfg, seed=0)
    if not with_images:            # halves the compile time; the MoE test is about the LLM
      self.batch = {k: v for k, v in self.batch.items() if k not in ts.IMAGE_KEYS}
    self.spec = ts.spec_of(self.batch)
    sched = ComponentSchedule(1e-3, 2)
    self.optimizer = build_optimizer(OptimizerConfig(total_steps=100, connector=sched, vit=sched,
                                                     llm=sched), ts.abstract_params(self.model, self.spec))
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    self.state0 = random_state(self.model, self.optimizer, self.spec)
    self._steps = {}
    self.reference = self.run_step(mesh)

  def step_fn(self, mesh, micro_batches=1, loss_chunk_size=0, offload=False):
    key = (tuple(mesh.shape.items()), micro_batches, loss_chunk_size, offload)
    if key not in self._steps:     # one compile per layout, shared by the tests
      _, shardings = ts.abstract_train_state(self.model, self.optimizer, mesh, self.spec,
                                             offload_opt_state=offload)
      self._steps[key] = ts.make_train_step(
          self.model, self.optimizer, mesh, shardings, self.spec,
          ts.StepConfig(micro_batches=micro_batches, z_loss_weight=1e-4,
                        loss_chunk_size=loss_chunk_size), donate=False), shardings
    return self._steps[key]

  def run_step(self, mesh, micro_batches=1, loss_chunk_size=0, offload=False):
    step, shardings = self.step_fn(mesh, micro_batches, loss_chunk_size, offload)
    state = jax.device_put(self.state0, shardings)
    new_state, metrics = step(state, ts.make_global_batch(self.batch, mesh))
    return jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def dense():
  return Setup("qwen2")


@pytest.fixture(scope="module")
def moe():
  return Setup("olmoe", with_images=False)


def assert_same_step(result, reference):
  state, metrics = result
  ref_state, ref_metrics = reference
  assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) <= TOL
  for name in ("grad_norm/llm", "grad_norm/connector", "weight_sum"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-4, atol=1e-6)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       state.params, ref_state.params)
  worst = max(jax.tree.leaves(diffs))
  assert worst <= TOL, worst
  assert int(state.step) == int(ref_state.step) == 1


@pytest.mark.parametrize("axes", [dict(data=8), dict(fsdp=4, tensor=2)], ids=["data8", "fsdp4_tensor2"])
def test_dense_layouts_match_one_device(dense, axes):
  mesh = sharding.make_mesh(**axes)
  result = dense.run_step(mesh)
  assert_same_step(result, dense.reference)
  # The step really moved the parameters (a no-op step would also "match").
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), result[0].params, dense.state0.params)
  assert moved["llm"]["blocks"]["mlp"]["up"]["kernel"] > 1e-4


def test_moe_layout_matches_one_device(moe):
  mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
  assert_same_step(moe.run_step(mesh), moe.reference)


def test_micro_batches_equal_full_batch(dense):
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  result = dense.run_step(mesh, micro_batches=2)      # 2 slices of 4 rows
  assert_same_step(result, dense.reference)
  assert float(result[1]["token_count"]) == float(dense.reference[1]["token_count"])


def test_optimizer_state_offloaded_to_host_gives_the_same_step(dense):
  """AdamW's moments live in pinned host memory between steps (offload_optimizer_state): the
  state's moment shardings say so, scalars stay on the device, and the step is unchanged."""
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  step, shardings = dense.step_fn(mesh, micro_batches=2, offload=True)
  kinds = {(len(a.shape) > 0, s.memory_kind) for a, s in zip(
      jax.tree.leaves(dense.state0.opt_state), jax.tree.leaves(shardings.opt_state))}
  assert (True, "pinned_host") in kinds and (True, "device") not in kinds, kinds
  assert "pinned_host" not in {s.memory_kind for s in jax.tree.leaves(shardings.params)}
  result = dense.run_step(mesh, micro_batches=2, offload=True)
  assert_same_step(result, dense.reference)


def test_chunked_loss_step_equals_plain_step(dense):
  """LM head + loss over chunks of 12 positions (T = 32: the last chunk is padded), vocabulary
  split over tensor, with accumulation: same loss, metrics and update as the plain step."""
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  result = dense.run_step(mesh, micro_batches=2, loss_chunk_size=12)
  assert_same_step(result, dense.reference)
  for name in ("accuracy", "token_count", "z_loss"):
    np.testing.assert_allclose(result[1][name], dense.reference[1][name], rtol=1e-5, atol=1e-7)


def test_batch_not_divisible_is_a_clear_error(dense):
  mesh = sharding.make_mesh(data=8)
  with pytest.raises(ValueError, match="micro_batches"):
    dense.step_fn(mesh, micro_batches=2)              # 8 rows cannot be 2 x (8 shards)


def test_loss_falls_and_frozen_rows_stay(dense):
  mesh = sharding.make_mesh(data=8)
  step, shardings = dense.step_fn(mesh)
  state = jax.device_put(dense.state0, shardings)
  batches = [ts.make_global_batch(make_batch(dense.cfg, seed=s), mesh) for s in range(3)]
  losses = []
  for i in range(30):
    state, metrics = step(state, batches[i % 3])
    losses.append(float(metrics["loss"]))
  assert all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
  final = jax.device_get(state.params)
  frozen = final["llm"]["embedding"]["pretrained"]
  assert np.array_equal(frozen.view(np.uint32),
                        dense.state0.params["llm"]["embedding"]["pretrained"].view(np.uint32))
  assert not np.array_equal(final["llm"]["lm_head"], dense.state0.params["llm"]["lm_head"])
  assert int(state.step) == 30


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------

def _matmul_params(tree, prefix: str) -> int:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  total = 0
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith(prefix) and name.endswith("kernel"):
      total += math.prod(leaf.shape)
  return total


@pytest.mark.parametrize("family", ["qwen2", "olmoe"])
def test_llm_flops_are_two_per_weight_plus_causal_attention(family):
  cfg = C.tiny(family)
  params = ts.abstract_params(Molmo(cfg), ts.batch_spec(cfg, 1, 8))
  llm = cfg.llm
  weights = _matmul_params(params, "llm/blocks/attention")
  if llm.is_moe:
    experts = sum(math.prod(params["llm"]["blocks"]["moe"][k].shape) for k in ("gate", "up", "down"))
    weights += experts * llm.experts_per_token // llm.num_experts
    weights += math.prod(params["llm"]["blocks"]["moe"]["router"].shape)
  else:
    weights += _matmul_params(params, "llm/blocks/mlp")
  weights += math.prod(params["llm"]["lm_head"].shape)
  attention = llm.num_layers * 2 * T * llm.num_heads * llm.head_dim      # causal: half of 4*T*H*h
  assert flops.llm_forward_flops(cfg, B, T) == B * T * (2 * weights + attention)


def test_vision_flops_count_every_block_weight():
  cfg = C.tiny("qwen2")
  params = ts.abstract_params(Molmo(cfg), ts.batch_spec(cfg, 1, 8))
  vis = cfg.vision
  block_weights = _matmul_params(params, "vision/blocks")
  per_crop = (2 * block_weights * vis.num_positions
              + vis.num_layers * vis.num_positions * 4 * vis.num_positions * vis.num_heads * vis.head_dim
              + 2 * vis.num_patches * math.prod(params["vision"]["patch_embed"]["kernel"].shape))
  assert flops.vision_forward_flops(cfg, crops=3) == 3 * per_crop


def test_train_flops_of_7b_d_are_about_six_n_per_token():
  cfg = C.preset("molmo-7b-d")
  step = flops.train_step_flops(cfg, batch=1, seq_len=2304, crops_per_example=13)
  llm_per_token = step.llm * 3 / 2304
  # 7.07 B matmul weights (layers + LM head; the input embedding is a lookup) -> 6N = 42.4 GFLOP
  # per token, plus causal attention 3 * 28 * 2 * 2304 * 3584 = 1.4 GFLOP.
  assert 43.5e9 < llm_per_token < 44.2e9
  assert step.train == 3 * (step.vision + step.connector + step.llm)
  assert step.vision > step.connector > 0


@pytest.mark.parametrize("kind,platform,name", [
    ("TPU v4", "tpu", "TPU v4"), ("TPU v5 lite", "tpu", "TPU v5e"), ("TPU v5", "tpu", "TPU v5p"),
    ("TPU v5p", "tpu", "TPU v5p"), ("TPU v6 lite", "tpu", "TPU v6e"),
    ("NVIDIA H100 80GB HBM3", "gpu", "NVIDIA H100"), ("NVIDIA H200", "gpu", "NVIDIA H200"),
    ("cpu", "cpu", "CPU (nominal)")])
def test_peak_flops_lookup(kind, platform, name):
  assert flops.peak_flops_per_device(kind, platform)[0] == name


def test_unknown_accelerator_asks_for_an_override():
  with pytest.raises(ValueError, match="peak_flops_per_device"):
    flops.peak_flops_per_device("Mystery Chip 9000", "gpu")


# ------------------------------------------------------------------------------------------
# Recipe configs
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,arg", [
    ("pretrain_captioner", "molmo-7b-d"), ("pretrain_captioner", "molmoe-1b"),
    ("finetune_multitask", "molmo-72b"), ("finetune_multitask", "molmo-7b-o"),
    ("finetune_custom", "model=/ckpt/m,data=/d/train.jsonl"), ("tiny_test", "olmoe")])
def test_recipes_build_valid_configs(module, arg):
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  experiment.import_recipe_plugins(config)   # as a run does: the synthetic source kind registers
  opt = OptimizerConfig.from_mapping({**config.optimizer.to_dict(), "total_steps": config.total_steps})
  data = experiment.data_config(config.data)
  assert data.seq_len == (256 if module == "tiny_test" else 2304)
  if config.model.name:
    model = experiment.build_model_config(config.model)
    assert model.llm.response_residual_dropout in (0.0, 0.1)
  if module == "pretrain_captioner":
    assert (opt.connector.learning_rate, opt.vit.warmup_steps, opt.llm.learning_rate) == (2e-4, 2000, 2e-5)
    assert data.global_batch_size == 128 and model.llm.response_residual_dropout == 0.1
  if module == "finetune_multitask":
    assert data.global_batch_size == 256 and config.total_steps == 30_000
    assert model.llm.residual_dropout == 0.1 and len(data.sources) == 31
    assert dict(data.group_rates) == {"demo": 0.15, "aux": 0.5, "pointing": 0.35}
  assert (opt.b1, opt.b2, opt.eps, opt.alpha_f) == (0.9, 0.95, 1e-6, 0.1)


def test_model_overrides_are_checked():
  with pytest.raises(ValueError, match="unknown field"):
    experiment.build_model_config({"name": "tiny-qwen2", "llm": {"dropout": 0.1}})
  cfg = experiment.build_model_config({"name": "tiny-qwen2", "dtype": "bfloat16", "llm": {"num_layers": 3}})
  assert cfg.dtype == "bfloat16" and cfg.llm.num_layers == 3 and cfg.param_dtype == "float32"
