"""Weight-only int8/int4 (qwix): dequantized weights within half a per-channel step of the
originals, every targeted matmul weight quantized, logits close to float, greedy generation
through the quantized Predictor."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax import quantize as Q
from molmo_jax.generate import SamplingConfig, generate
from molmo_jax.models.molmo import Molmo, abstract_params
from model_helpers import random_params


@pytest.fixture(scope="module")
def tiny():
  cfg = C.tiny("qwen2")
  params = random_params(abstract_params(cfg), seed=0)
  return cfg, params


def batch_for(cfg, seed=0, length=12):
  rng = np.random.default_rng(seed)
  v = cfg.vision
  q = (v.grid_size // cfg.connector.pool_height) ** 2
  ids = rng.integers(0, cfg.llm.vocab_size, (2, length)).astype(np.int32)
  ids[1, -3:] = -1
  idx = np.full((2, 1, q), -1, np.int32)
  idx[:, 0] = np.arange(q) + 1
  return {"input_ids": ids,
          "images": rng.normal(size=(2, 1, v.num_patches, v.patch_dim)).astype(np.float32),
          "image_masks": np.ones((2, 1, v.num_patches), np.float32),
          "image_input_idx": idx}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantized_weights_within_half_a_step_of_the_originals(tiny, mode):
  cfg, params = tiny
  qmodel = Q.quantized_model(Molmo(cfg), Q.QuantizeConfig(mode, vit=True))
  qparams = Q.quantize_params(qmodel, params)
  leaves = Q.quantized_leaves(qparams)
  expected = {"llm/lm_head", "llm/blocks/attention/query/kernel", "llm/blocks/attention/out/kernel",
              "llm/blocks/mlp/down/kernel", "vision/blocks/attention/query/kernel"}
  missing = expected - set(leaves)
  assert not missing, sorted(leaves)
  assert not any(k.startswith("connector/") for k in leaves)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  bound = 127.5 if mode == "int8" else 7.5     # qwix: qmax + 0.5, values clipped to qmax
  for name, q in leaves.items():
    w = np.asarray(flat[name], np.float32)
    assert q.qvalue.dtype == (jnp.int8 if mode == "int8" else jnp.int4)
    assert q.qvalue.shape == w.shape
    stacked = name.startswith(("llm/blocks", "vision/blocks"))
    w = w.reshape(q.qvalue.shape)
    scale = np.asarray(q.scale, np.float32)
    assert scale.ndim == w.ndim
    if stacked:
      assert scale.shape[0] == w.shape[0]           # every scanned layer keeps its own scales
    assert scale.shape[-1] == w.shape[-1] > 1      # one scale per output channel
    deq = np.asarray(Q.dequantize_params({"w": qparams_leaf(qparams, name)})["w"], np.float32)
    err = np.abs(deq - w)
    # Half a quantization step, up to fp32 rounding of w / s (the issue: within one scale).
    assert np.all(err <= scale * (0.5 + 1e-4)), (name, float(np.max(err / scale)))
    reduced = tuple(i for i in range(w.ndim) if scale.shape[i] == 1)
    np.testing.assert_allclose(np.max(np.abs(w), axis=reduced, keepdims=True) / bound, scale,
                               rtol=1e-5)


def qparams_leaf(qparams, name):
  node = qparams
  for key in name.split("/"):
    node = node[key]
  return node


def test_int8_logits_close_to_float_and_int4_further(tiny):
  cfg, params = tiny
  batch = {k: jnp.asarray(v) for k, v in batch_for(cfg).items()}
  reference = np.asarray(Molmo(cfg).apply({"params": params}, batch)[0])
  errors = {}
  for mode in ("int8", "int4"):
    qmodel = Q.quantized_model(Molmo(cfg), Q.QuantizeConfig(mode))
    qparams = Q.quantize_params(qmodel, params)
    logits = np.asarray(qmodel.apply({"params": qparams}, batch)[0])
    # The quantized model computes exactly with its dequantized weights (up to fp32 rounding).
    deq = np.asarray(Molmo(cfg).apply({"params": Q.dequantize_params(qparams, like=params)},
                                      batch)[0])
    np.testing.assert_allclose(logits, deq, rtol=0, atol=2e-4 * np.abs(deq).max())
    errors[mode] = float(np.max(np.abs(logits - reference)))
  scale = float(np.abs(reference).max())
  assert 0 < errors["int8"] < 0.05 * scale, errors
  assert errors["int4"] > errors["int8"], errors
  assert Q.param_bytes(Q.quantize_params(Q.quantized_model(Molmo(cfg), Q.QuantizeConfig("int8")),
                                         params)) < Q.param_bytes(params)


def test_quantized_greedy_generation_runs_and_mostly_agrees(tiny):
  cfg, params = tiny
  batch = batch_for(cfg, seed=1)
  sampling = SamplingConfig(max_new_tokens=6)
  qmodel = Q.quantized_model(Molmo(cfg), Q.QuantizeConfig("int8"))
  qparams = Q.quantize_params(qmodel, params)
  out = generate(qmodel, qparams, batch, sampling)
  ref = generate(Molmo(cfg), params, batch, sampling)
  assert out.tokens.shape == (2, 6)
  assert np.all(out.lengths == 6)
  assert np.mean(out.tokens == ref.tokens) >= 0.5, (out.tokens, ref.tokens)


def test_prefill_in_row_passes_matches_one_pass(tiny):
  cfg, params = tiny
  batch = batch_for(cfg, seed=2)
  sampling = SamplingConfig(max_new_tokens=4)
  from molmo_jax.generate import _generate
  model = Molmo(cfg)
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  one = jax.jit(lambda p, b: _generate(p, b, jax.random.PRNGKey(0), model=model,
                                       sampling=sampling))(params, inputs)
  two = jax.jit(lambda p, b: _generate(p, b, jax.random.PRNGKey(0), model=model, sampling=sampling,
                                       prefill_rows_per_pass=1))(params, inputs)
  np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(two[0]))


def test_mode_parsing():
  assert Q.from_mapping("int8") == Q.QuantizeConfig("int8")
  assert Q.from_mapping("int4+vit") == Q.QuantizeConfig("int4", vit=True)
  assert not Q.from_mapping(None).enabled and not Q.from_mapping("none").enabled
  with pytest.raises(ValueError, match="mode"):
    Q.from_mapping("int3")
  with pytest.raises(ValueError, match="int8\\+vit"):
    Q.from_mapping("int8+llm")


def test_saved_quantized_directory_loads_in_the_predictor(tmp_path):
  """python -m molmo_jax.quantize writes int8 values + scales (smaller than the float weights);
  Predictor.from_checkpoint loads them as they were quantized at load time and generates the
  same tokens; float-only loaders refuse the directory."""
  from PIL import Image
  from molmo_jax import errors
  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
  from molmo_jax.model_dir import load_model_checkpoint, save_model_checkpoint
  from molmo_jax.predictor import Predictor

  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  params = random_params(abstract_params(cfg), seed=3)
  save_demo_tokenizer(tmp_path / "tok", build_demo_tokenizer(vocab_size=448))
  save_model_checkpoint(tmp_path / "float", jax.device_get(params), cfg,
                        tokenizer_dir=tmp_path / "tok")
  assert Q.main(["--model", str(tmp_path / "float"), "--out", str(tmp_path / "q8")]) == 0

  def size(path):
    return sum(p.stat().st_size for p in (path / "params").rglob("*") if p.is_file())
  assert size(tmp_path / "q8") < size(tmp_path / "float")
  saved = Predictor.from_checkpoint(tmp_path / "q8")
  at_load = Predictor.from_checkpoint(tmp_path / "float", dtype="bfloat16", quantize="int8")
  assert saved.quantize == Q.QuantizeConfig("int8")
  mine, theirs = Q.quantized_leaves(saved.params), Q.quantized_leaves(at_load.params)
  assert set(mine) == set(theirs) and "llm/blocks/mlp/down/kernel" in mine
  for name, q in mine.items():
    assert q.qvalue.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(q.qvalue), np.asarray(theirs[name].qvalue))
    np.testing.assert_array_equal(np.asarray(q.scale, np.float32),
                                  np.asarray(theirs[name].scale, np.float32))
  image = tmp_path / "a.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)).save(image)
  sampling = SamplingConfig(max_new_tokens=4)
  a = saved.predict([str(image)], ["Count the dots."], sampling=sampling)[0]
  b = at_load.predict([str(image)], ["Count the dots."], sampling=sampling)[0]
  assert a.tokens == b.tokens and len(a.tokens) >= 1
  with pytest.raises(errors.UserError, match="quantized"):
    load_model_checkpoint(tmp_path / "q8")
  with pytest.raises(errors.UserError, match="int4"):
    Predictor.from_checkpoint(tmp_path / "q8", quantize="int4")
