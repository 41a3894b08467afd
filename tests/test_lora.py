"""LoRA: zero-init adapters keep the base's logits, training moves only the adapters (and the fully
trained parts), merged weights equal base + adapters, adapter files round-trip and merge into a
model directory, the optimizer holds state only for trainable leaves; with an int8 base
(lora.base_dtype="int8") the frozen kernels are int8, the logits are those of the int8-quantized
model, training leaves the int8 values bit-identical and resumes exactly; the training preview
of a LoRA run answers with the adapters."""

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax import errors
from molmo_jax import lora
from molmo_jax import sharding
from molmo_jax.models.molmo import Molmo
from molmo_jax.training import train_step as ts
from molmo_jax.model_dir import load_model_checkpoint, save_model_checkpoint
from molmo_jax.training.optimizer import ComponentSchedule, OptimizerConfig, build_optimizer
from test_train_step import make_batch

LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("llm", "connector"),
                       train=("connector",))


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _lora_run_parts(cfg, lora_cfg, batch):
  """(LoRA model, batch spec, optimizer training only the adapters, 2x2 data x fsdp mesh)."""
  model = lora.LoraModel(Molmo(cfg), lora_cfg)
  spec = ts.spec_of(batch)
  sched = ComponentSchedule(3e-2, 1)
  optimizer = build_optimizer(
      OptimizerConfig(total_steps=50, connector=sched, vit=sched, llm=sched,
                      trainable_patterns=lora_cfg.trainable_patterns()),
      ts.abstract_params(model, spec))
  mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
  return model, spec, optimizer, mesh


@pytest.fixture(scope="module")
def setup():
  cfg = C.tiny("qwen2")
  batch = make_batch(cfg, seed=0)
  model, spec, optimizer, mesh = _lora_run_parts(cfg, LORA, batch)
  state = ts.init_train_state(model, optimizer, mesh, spec, jax.random.PRNGKey(0))
  state0 = jax.device_get(state)
  _, shardings = ts.abstract_train_state(model, optimizer, mesh, spec)
  step = ts.make_train_step(model, optimizer, mesh, shardings, spec,
                            ts.StepConfig(micro_batches=2), donate=False)
  losses = []
  for i in range(4):
    state, metrics = step(state, ts.make_global_batch(make_batch(cfg, seed=i), mesh))
    losses.append(float(metrics["loss"]))
  return dict(cfg=cfg, model=model, batch=batch, optimizer=optimizer, state0=state0,
              state=jax.device_get(state), losses=losses)


def forward(module, params, batch):
  inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "images", "image_masks",
                                                "image_input_idx")}
  return np.asarray(jax.jit(lambda p, b: module.apply({"params": p}, b)[0])(params, inputs))


def test_adapters_sit_in_the_targeted_layers_with_logical_axes(setup):
  boxed = setup["model"].init(jax.random.PRNGKey(0), ts._init_batch(ts.spec_of(setup["batch"])))
  names = {k: v.names for k, v in flat(boxed["params"]).items() if k.endswith(("lora_a", "lora_b"))}
  assert names["llm/blocks/attention/query/lora_a"] == ("layers", "embed", "lora_rank")
  assert names["llm/blocks/attention/query/lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
  assert names["llm/blocks/mlp/down/lora_a"] == ("layers", "mlp", "lora_rank")
  assert "connector/projector/up/lora_a" in names
  assert not any(k.startswith("vision/") for k in names)        # the ViT is not a target here
  assert len(names) == 2 * (7 + 4 + 3)                          # q k v o gate up down; pool; proj
  # Every adapter is sharded over fsdp once: A by its input axis, B by its rank unless its output
  # axis already holds fsdp (a replicated B would be held whole by every chip).
  mesh = sharding.make_mesh(fsdp=4, devices=jax.devices()[:4])
  specs = {k: v.spec for k, v in flat(sharding.param_shardings(boxed["params"], mesh)).items()
           if k.endswith(("lora_a", "lora_b"))}
  assert specs["llm/blocks/attention/query/lora_b"][1] in ("fsdp", ("fsdp", "expert"))
  assert specs["llm/blocks/mlp/gate/lora_b"][1] in ("fsdp", ("fsdp", "expert"))
  for key, spec in specs.items():
    used = [axis for entry in spec if entry for axis in (entry if isinstance(entry, tuple) else (entry,))]
    assert used.count("fsdp") == 1, (key, spec)


def test_zero_init_b_gives_exactly_the_base_logits(setup):
  params = setup["state0"].params
  assert all(np.all(v == 0) for k, v in flat(params).items() if k.endswith("lora_b"))
  base = lora.base_params(params)
  base = jax.tree.map(lambda x: np.asarray(x, np.float32), base)
  with_adapters = forward(setup["model"], params, setup["batch"])
  plain = forward(Molmo(setup["cfg"]), base, setup["batch"])
  np.testing.assert_array_equal(with_adapters, plain)


def test_training_moves_adapters_only_and_learns(setup):
  before, after = flat(setup["state0"].params), flat(setup["state"].params)
  labels = flat(setup["optimizer"].labels)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  for key in before:
    if labels[key] == "frozen":
      assert np.array_equal(before[key], after[key]), key         # bit-identical
  assert {k for k in moved if k.endswith("lora_b")} == {k for k in before if k.endswith("lora_b")}
  assert any(k.startswith("connector/") and k.endswith("kernel") for k in moved)   # fully trained
  assert not any(k.startswith("llm/blocks/") and k.endswith("kernel") for k in moved)
  losses = setup["losses"]
  assert losses[-1] < losses[0], losses


def test_optimizer_state_only_for_trainable_leaves(setup):
  trainable = {k for k, label in flat(setup["optimizer"].labels).items() if label != "frozen"}
  state_size = sum(np.size(x) for x in jax.tree.leaves(setup["state"].opt_state))
  trainable_size = sum(np.size(v) for k, v in flat(setup["state"].params).items() if k in trainable)
  scalars = 16                          # counts and per-component norms, a handful of scalars
  assert 2 * trainable_size <= state_size <= 2 * trainable_size + scalars   # Adam mu and nu
  assert "llm/blocks/mlp/up/kernel" not in trainable
  assert "llm/blocks/mlp/up/lora_a" in trainable and "connector/projector/up/kernel" in trainable


def test_frozen_base_can_be_held_in_bfloat16(setup):
  spec = ts.spec_of(setup["batch"])
  mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
  abstract, _ = ts.abstract_train_state(setup["model"], setup["optimizer"], mesh, spec, "bfloat16")
  dtypes = {k: v.dtype for k, v in flat(abstract.params).items()}
  assert dtypes["llm/blocks/mlp/up/kernel"] == jnp.bfloat16
  assert dtypes["llm/blocks/mlp/up/lora_a"] == jnp.float32
  assert dtypes["connector/projector/up/kernel"] == jnp.float32


def test_merged_weights_give_the_logits_of_base_plus_adapters(setup):
  params = setup["state"].params
  with_adapters = forward(setup["model"], params, setup["batch"])
  merged = lora.merge_adapters(lora.base_params(params), lora.adapter_params(params, LORA), LORA)
  assert not any(k.endswith(("lora_a", "lora_b")) for k in flat(merged))
  plain = forward(Molmo(setup["cfg"]), merged, setup["batch"])
  base_only = forward(Molmo(setup["cfg"]), lora.base_params(params), setup["batch"])
  assert np.max(np.abs(with_adapters - base_only)) > 1e-3        # the adapters do something
  np.testing.assert_allclose(plain, with_adapters, rtol=0, atol=1e-5)


def test_adapter_files_round_trip_and_merge_into_a_model_directory(setup, tmp_path):
  params = setup["state"].params
  cfg = setup["cfg"]
  base_dir = save_model_checkpoint(tmp_path / "base", lora.base_params(params), cfg)
  adapter_dir = lora.save_adapters(tmp_path / "adapters", params, LORA)
  tree, loaded_cfg = lora.load_adapters(adapter_dir)
  assert loaded_cfg == LORA
  expected = lora.adapter_params(params, LORA)
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(tree), expected))
  sizes = lambda t: sum(np.size(x) for x in jax.tree.leaves(t))
  assert sizes(tree) < sizes(params)
  with pytest.raises(FileExistsError):
    lora.save_adapters(adapter_dir, params, LORA)

  run = lambda *argv: errors.run_main(lora.main, ["merge", *argv])
  assert run("--base", str(base_dir), "--adapters", str(adapter_dir),
             "--out", str(tmp_path / "merged")) == 0
  merged = load_model_checkpoint(tmp_path / "merged")
  assert merged.config == cfg
  reference = lora.merge_adapters(lora.base_params(params), expected, LORA)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6, rtol=0),
                                   jax.device_get(merged.params), reference))
  assert run("--base", str(tmp_path / "nope"), "--adapters", str(adapter_dir),
             "--out", str(tmp_path / "x")) == 2
  assert not (tmp_path / "x").exists()
  assert run("--base", str(base_dir), "--adapters", str(base_dir),           # not adapters
             "--out", str(tmp_path / "y")) == 2
  assert run("--base", str(base_dir), "--adapters", str(adapter_dir),        # exists already
             "--out", str(tmp_path / "merged")) == 2


def test_config_validation():
  with pytest.raises(ValueError, match="lora.rank"):
    lora.LoraConfig(rank=-1)
  with pytest.raises(ValueError, match="lora.base_dtype: expected float32, bfloat16 or int8, "
                     "got 'int4'"):
    lora.LoraConfig(rank=2, base_dtype="int4")
  assert lora.LoraConfig(rank=2, base_dtype="int8").quantized_base
  with pytest.raises(ValueError, match="unknown field"):
    lora.LoraConfig.from_mapping({"rank": 2, "ranks": 3})
  cfg = lora.LoraConfig.from_mapping({"rank": 2, "targets": "llm_attention,connector"})
  assert cfg.targets == ("llm_attention", "connector")
  assert cfg.targets_module("llm/blocks/attention/out")
  assert not cfg.targets_module("llm/blocks/mlp/up")
  assert lora.with_lora(Molmo(C.tiny("qwen2")), lora.LoraConfig()).__class__ is Molmo


def test_chunked_loss_with_adapters_equals_the_plain_loss(setup):
  # The chunked loss applies the raw LM head to the model's final hidden states; the adapters
  # act inside the layers, so with trained (non-zero) adapters both losses and gradients agree.
  model, cfg = setup["model"], setup["cfg"]
  params = jax.tree.map(jnp.asarray, setup["state"].params)
  batch = {k: jnp.asarray(v) for k, v in make_batch(cfg, seed=7).items()}
  assert any(float(jnp.max(jnp.abs(v))) > 0 for k, v in flat(params).items() if k.endswith("lora_b"))

  def loss_and_grads(chunk):
    loss_fn = ts.make_loss_fn(model, setup["optimizer"].labels,
                              ts.StepConfig(loss_chunk_size=chunk))
    normaliser = jnp.sum(batch["loss_weights"])
    grad = jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(0), normaliser)[0])
    return jax.jit(grad)(params)

  (plain, plain_grads), (chunked, chunked_grads) = loss_and_grads(0), loss_and_grads(16)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
  for (path, a), b in zip(flat(plain_grads).items(), flat(chunked_grads).values()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=path)


# ------------------------------------------------------------------------------------------
# int8 frozen base (lora.base_dtype="int8", QLoRA-style)
# ------------------------------------------------------------------------------------------

LORA8 = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("llm", "connector"),
                        train=("connector",), base_dtype="int8")


@pytest.fixture(scope="module")
def int8_setup(setup, tmp_path_factory):
  """An int8-base LoRA state made from the float fixture's start parameters (B = 0), 4 steps
  with the chunked loss (so the LM head runs as int8 values x scales there), and a resume from
  a checkpoint of step 2."""
  from molmo_jax.training.checkpoint import TrainCheckpointer
  cfg, batch = setup["cfg"], setup["batch"]
  model, spec, optimizer, mesh = _lora_run_parts(cfg, LORA8, batch)
  float_params = setup["state0"].params
  state = ts.init_train_state(model, optimizer, mesh, spec, jax.random.PRNGKey(0),
                              params=float_params, frozen_dtype=LORA8.frozen_dtype)
  state0 = jax.device_get(state)
  abstract, shardings = ts.abstract_train_state(model, optimizer, mesh, spec, LORA8.frozen_dtype)
  step = ts.make_train_step(model, optimizer, mesh, shardings, spec,
                            ts.StepConfig(micro_batches=2, loss_chunk_size=16), donate=False)
  batches = [ts.make_global_batch(make_batch(cfg, seed=i), mesh) for i in range(4)]
  losses, saved = [], None
  for i in range(4):
    state, metrics = step(state, batches[i])
    losses.append(float(metrics["loss"]))
    if i == 1:
      ckpt = TrainCheckpointer(tmp_path_factory.mktemp("int8_ckpt"), save_every=1, keep=None,
                               async_save=False)
      ckpt.save(2, state.params, state.opt_state, state.rng, force=True)
      restored = ckpt.restore(2, abstract_state={"params": abstract.params,
                                                 "opt_state": abstract.opt_state,
                                                 "rng": abstract.rng})
      ckpt.close()
      saved = ts.TrainState(step=jax.device_put(jnp.int32(2), sharding.replicated(mesh)),
                            params=restored["params"], opt_state=restored["opt_state"],
                            rng=restored["rng"])
  resumed_losses = []
  for i in (2, 3):
    saved, metrics = step(saved, batches[i])
    resumed_losses.append(float(metrics["loss"]))
  return dict(cfg=cfg, model=model, optimizer=optimizer, abstract=abstract, state0=state0,
              state=jax.device_get(state), losses=losses, resumed=jax.device_get(saved),
              resumed_losses=resumed_losses, float_params=float_params)


def test_int8_base_state_holds_int8_kernels_with_sharded_scales(int8_setup):
  params = flat(int8_setup["state0"].params)
  assert params["llm/blocks/attention/query/kernel/qvalue"].dtype == jnp.int8
  assert params["llm/blocks/attention/query/kernel/scale"].shape == (2, 1, 4, 16)
  for name in ("attention/key", "attention/value", "attention/out", "mlp/gate", "mlp/up",
               "mlp/down"):
    assert params[f"llm/blocks/{name}/kernel/qvalue"].dtype == jnp.int8
  assert params["llm/lm_head/qvalue"].dtype == jnp.int8
  # The rest of the frozen base is bfloat16, scales too; trained leaves keep param_dtype.
  assert params["llm/lm_head/scale"].dtype == jnp.bfloat16
  assert params["llm/blocks/attn_norm/scale"].dtype == jnp.bfloat16
  assert params["llm/embedding/pretrained"].dtype == jnp.bfloat16
  assert params["vision/blocks/attention/query/kernel"].dtype == jnp.bfloat16   # not quantized
  assert params["llm/blocks/attention/query/lora_a"].dtype == jnp.float32
  assert params["connector/projector/up/kernel"].dtype == jnp.float32             # trained
  assert not any(k.startswith("connector/") and k.endswith(("qvalue", "scale")) for k in params)
  # Values shard like the kernel; a scale like the kernel's output axes.
  mesh = sharding.make_mesh(fsdp=4, devices=jax.devices()[:4])
  boxed = jax.eval_shape(int8_setup["model"].init, jax.random.PRNGKey(0), ts._init_batch(
      ts.spec_of(make_batch(int8_setup["cfg"], 0))))["params"]
  specs = {k: tuple(v.spec) for k, v in flat(sharding.param_shardings(boxed, mesh)).items()}
  fsdp = ("fsdp", ("fsdp", "expert"))
  assert specs["llm/blocks/mlp/up/kernel/qvalue"][1] in fsdp
  assert specs["llm/blocks/mlp/up/kernel/scale"][1] is None          # the reduced (size-1) axis
  assert specs["llm/blocks/mlp/up/kernel/scale"][2:] == specs["llm/blocks/mlp/up/kernel/qvalue"][2:]
  assert specs["llm/lm_head/qvalue"][0] in fsdp and specs["llm/lm_head/scale"][0] is None


def test_int8_base_with_zero_b_gives_the_int8_quantized_model_logits(int8_setup, setup):
  """B = 0: the LoRA model on its int8 state computes what the int8-quantized plain model
  (quantize.quantized_model + quantize_params) computes on the same base."""
  from molmo_jax import quantize as Q
  cfg, batch = setup["cfg"], setup["batch"]
  state_params = int8_setup["state0"].params
  qmodel = Q.quantized_model(Molmo(cfg), Q.QuantizeConfig("int8"))
  reference = flat(Q.to_storable(Q.quantize_params(qmodel, lora.base_params(
      int8_setup["float_params"]))))
  base = flat(lora.base_params(state_params))
  assert set(reference) == set(base)
  for key, value in base.items():
    if value.dtype == jnp.int8:
      np.testing.assert_array_equal(value, reference[key], err_msg=key)   # one quantizer
  reference = {k: np.asarray(v).astype(base[k].dtype) for k, v in reference.items()}
  reference = Q.from_storable(flax.traverse_util.unflatten_dict(reference, sep="/"), qmodel)
  expected = np.asarray(jax.jit(lambda p, b: qmodel.apply({"params": p}, b)[0])(
      reference, {k: jnp.asarray(batch[k]) for k in ("input_ids", "images", "image_masks",
                                                     "image_input_idx")}))
  got = forward(int8_setup["model"], state_params, batch)
  # The same quantized matmuls; XLA may order the fp32 sums differently in the two programs.
  assert np.max(np.abs(got - expected)) <= 1e-6 * np.max(np.abs(expected))


def test_int8_base_logits_close_to_the_float_base(int8_setup, setup):
  batch = setup["batch"]
  params = int8_setup["float_params"]
  reference = forward(setup["model"], params, batch)
  bf16_lora = dataclasses.replace(LORA, base_dtype="bfloat16")
  bf16 = forward(lora.LoraModel(Molmo(setup["cfg"]), bf16_lora), lora.cast_frozen(params, bf16_lora),
                 batch)
  int8 = forward(int8_setup["model"], int8_setup["state0"].params, batch)
  scale = float(np.max(np.abs(reference)))
  errors = {"bfloat16": float(np.max(np.abs(bf16 - reference))),
            "int8": float(np.max(np.abs(int8 - reference)))}
  print(f"max |logits - float32 base| over logits up to {scale:.3f}: {errors}")
  assert 0 < errors["int8"] < 0.05 * scale, errors       # per-channel int8, as in test_quantize
  assert errors["bfloat16"] < errors["int8"], errors


def test_int8_base_training_moves_adapters_only_and_learns(int8_setup):
  before, after = flat(int8_setup["state0"].params), flat(int8_setup["state"].params)
  labels = flat(int8_setup["optimizer"].labels)
  losses = int8_setup["losses"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for key in before:
    if labels[key] == "frozen":
      assert np.array_equal(before[key], after[key]), key          # int8 values bit-identical
  assert all(labels[k] == "frozen" for k in before if k.endswith(("/qvalue", "lm_head/scale")))
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert {k for k in moved if k.endswith("lora_b")} == {k for k in before if k.endswith("lora_b")}
  assert any(k.startswith("connector/") and k.endswith("kernel") for k in moved)
  # AdamW state (mu, nu) for the trainable leaves only: nothing for int8 values or scales.
  trainable = {k for k, label in labels.items() if label != "frozen"}
  state_size = sum(np.size(x) for x in jax.tree.leaves(int8_setup["state"].opt_state))
  trainable_size = sum(np.size(v) for k, v in after.items() if k in trainable)
  assert 2 * trainable_size <= state_size <= 2 * trainable_size + 16
  assert not any(k.endswith(("qvalue", "scale")) and "kernel" in k for k in trainable)


def test_int8_base_resumes_exactly_from_a_checkpoint(int8_setup):
  assert int8_setup["resumed_losses"] == int8_setup["losses"][2:]          # bit-identical
  resumed, straight = int8_setup["resumed"], int8_setup["state"]
  assert int(resumed.step) == int(straight.step) == 4
  assert jax.tree.all(jax.tree.map(np.array_equal, resumed.params, straight.params))
  assert jax.tree.all(jax.tree.map(np.array_equal, resumed.opt_state, straight.opt_state))


def test_int8_base_never_quantizes_a_trained_layer():
  # lora.train trains the MLP in full: its kernels stay float (and train), attention is int8.
  cfg = C.tiny("qwen2")
  lora_cfg = lora.LoraConfig(rank=2, targets=("llm_attention",), train=(r"^llm/blocks/mlp/",),
                             base_dtype="int8")
  model = lora.LoraModel(Molmo(cfg), lora_cfg)
  assert model.base_quantization.exclude == tuple(
      re.escape(f"llm/blocks/mlp/{n}") for n in ("down", "gate", "up"))
  shapes = flat(ts.abstract_params(model, ts.spec_of(make_batch(cfg, 0))))
  assert shapes["llm/blocks/mlp/up/kernel"].dtype == jnp.float32
  assert shapes["llm/blocks/attention/query/kernel/qvalue"].dtype == jnp.int8
  assert lora.LoraConfig(rank=2, base_dtype="int8").frozen_dtype == "bfloat16"
  with pytest.raises(ValueError, match="int8"):
    lora.merge_adapters({"llm": {"q": {"kernel": {"qvalue": np.zeros((2, 2), np.int8),
                                                   "scale": np.ones((1, 2))}}}},
                        {"llm": {"q": {"lora_a": np.zeros((2, 1)), "lora_b": np.zeros((1, 2))}}},
                        lora_cfg)


class _Writer:
  """Records what a TrainingPreview logs (TensorBoard's add_image / add_text)."""

  def __init__(self):
    self.texts = {}

  def add_image(self, tag, image, step, dataformats):
    pass

  def add_text(self, tag, text, step):
    self.texts[tag] = text

  def flush(self):
    pass


def test_training_preview_of_a_lora_run_answers_with_the_adapters():
  import types

  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer
  from molmo_jax.data.sources import SourceConfig
  from molmo_jax.generate import SamplingConfig
  from molmo_jax.models.molmo import example_batch_shapes
  from molmo_jax.predictor import Predictor
  from molmo_jax.preprocess.tokens import MolmoTokenizer
  from molmo_jax.training.preview import TrainingPreview
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  tokenizer = MolmoTokenizer(build_demo_tokenizer(vocab_size=448), vocab_size=448)
  init_batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  base = flax.linen.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), init_batch))["params"]
  adapters = lora.init_adapters(lora.LoraModel(Molmo(cfg), LORA), jax.random.PRNGKey(1), init_batch)
  # Trained-looking adapters: B away from its zero init, large enough to change the answers.
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))
  adapters = flax.traverse_util.unflatten_dict({
      k: (3.0 * jax.random.normal(next(keys), v.shape, v.dtype) if k[-1] == "lora_b" else v)
      for k, v in flax.traverse_util.flatten_dict(adapters).items()})
  params = lora.combine(base, adapters)

  source = SourceConfig(name="shapes", kind="synthetic", options={"num_examples": 8, "seed": 0})
  exp = types.SimpleNamespace(data_config=types.SimpleNamespace(sources=[source]),
                              model_config=cfg, lora=LORA)
  writer = _Writer()
  preview = TrainingPreview(exp, tokenizer, writer, every=1, num_examples=2, max_new_tokens=8)
  assert len(preview.examples) == 2
  preview.log(0, params)

  images = [e["image"] for e in preview.examples]
  questions = [e["question"] for e in preview.examples]
  sampling = SamplingConfig(max_new_tokens=8)
  merged = lora.merge_adapters(lora.base_params(params), lora.adapter_params(params, LORA), LORA)
  with_adapters = [p.text for p in Predictor(cfg, merged, tokenizer).predict(images, questions,
                                                                             sampling=sampling)]
  base_only = [p.text for p in Predictor(cfg, base, tokenizer).predict(images, questions,
                                                                       sampling=sampling)]
  assert with_adapters != base_only     # the adapters change the answers
  logged = [writer.texts[f"preview/{i}"] for i in range(2)]
  for text, answer in zip(logged, with_adapters):
    assert f"**model:** {answer}  \n" in text, (text, answer)
