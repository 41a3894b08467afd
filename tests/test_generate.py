"""KV-cache generation: exactness against full forward passes, batching, meshes, sampling."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax import generate as generate_lib
from molmo_jax import sharding
from molmo_jax.generate import (LayerSlices, SamplingConfig, choose_tokens, filter_logits,
                                full_forward_greedy, generate, greedy_tokens)
from molmo_jax.models.molmo import Molmo, abstract_params

STEPS = 6


def _example(cfg, rng, length, crops):
  """One unpadded example with `crops` present crops; feature slots point at tokens 1..."""
  v = cfg.vision
  q = (v.grid_size // 2) ** 2
  ids = rng.integers(0, cfg.llm.vocab_size, (1, length)).astype(np.int32)
  images = rng.normal(size=(1, crops, v.num_patches, v.patch_dim)).astype(np.float32)
  masks = rng.choice([0.0, 0.5, 1.0], size=(1, crops, v.num_patches)).astype(np.float32)
  idx = np.full((1, crops, q), -100, np.int32)
  n_feat = min(length - 2, crops * 3)
  idx.reshape(1, -1)[0, :n_feat] = np.arange(1, n_feat + 1)
  return dict(input_ids=ids, images=images, image_masks=masks, image_input_idx=idx)


def _pad_batch(examples, length, crops):
  """Right-pads token ids with -1 and crops with absent (-1) rows, as the collator does."""
  out = {}
  for key in examples[0]:
    rows = []
    for ex in examples:
      x = ex[key]
      if key == "input_ids":
        x = np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=-1)
      else:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, crops - x.shape[1])
        x = np.pad(x, pad, constant_values=-1)
      rows.append(x)
    out[key] = np.concatenate(rows, 0)
  return out


def _params(cfg, example):
  return nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), example))["params"]


@pytest.mark.parametrize("family", ["qwen2", "olmo", "olmoe"])
def test_cached_greedy_equals_full_forward_and_batching_is_transparent(family):
  cfg = C.tiny(family)
  model = Molmo(cfg)
  rng = np.random.default_rng(0)
  a = _example(cfg, rng, length=11, crops=3)
  b = _example(cfg, rng, length=6, crops=1)
  params = _params(cfg, a)
  ref_a = full_forward_greedy(model, params, a, STEPS)
  ref_b = full_forward_greedy(model, params, b, STEPS)
  batch = _pad_batch([a, b], length=16, crops=3)
  out = generate(model, params, batch, SamplingConfig(max_new_tokens=STEPS))
  np.testing.assert_array_equal(out.tokens[0], ref_a)
  np.testing.assert_array_equal(out.tokens[1], ref_b)
  assert out.finish_reasons == ["length", "length"]
  assert out.lengths.tolist() == [STEPS, STEPS]


@pytest.mark.parametrize("family", ["qwen2", "olmo", "olmoe"])
def test_decoding_from_layer_slices_equals_decoding_through_the_layer_scan(family, monkeypatch):
  """On CPU the decode loop runs each layer from its own parameter slice and cache buffer
  (generate.LayerSlices); accelerators decode through the scanned stack. Same tokens, same
  log-probabilities, for every decoder family (pre/post norm, qk norm, MoE)."""
  cfg = C.tiny(family)
  model = Molmo(cfg)
  rng = np.random.default_rng(3)
  a, b = _example(cfg, rng, length=10, crops=2), _example(cfg, rng, length=7, crops=1)
  params = _params(cfg, a)
  batch = {k: jnp.asarray(v) for k, v in _pad_batch([a, b], length=12, crops=2).items()}
  sampling = SamplingConfig(max_new_tokens=STEPS, logprobs=True, top_logprobs=2)
  state = generate_lib.prefill(params, batch, model=model, steps=STEPS)
  sliced, sliced_state = generate_lib.enter_decode_loop(params, state, model)
  assert isinstance(sliced, LayerSlices) and len(sliced_state.cache) == cfg.llm.num_layers
  run = lambda: jax.jit(lambda p, x: generate_lib._generate(p, x, jax.random.PRNGKey(1), model=model,
                                                            sampling=sampling))(params, batch)
  tokens, lengths, _, scores = run()
  monkeypatch.setattr(generate_lib, "LAYER_SLICES_MAX_BYTES", -1)
  assert generate_lib.enter_decode_loop(params, state, model)[0] is params
  scan_tokens, scan_lengths, _, scan_scores = run()
  np.testing.assert_array_equal(tokens, scan_tokens)
  np.testing.assert_array_equal(lengths, scan_lengths)
  np.testing.assert_allclose(scores[0], scan_scores[0], atol=1e-5)
  np.testing.assert_allclose(scores[1], scan_scores[1], atol=1e-5)
  # The restacked cache equals the scan's, slot for slot.
  step = lambda p, st: generate_lib.decode_step(p, st, jnp.int32(12), jnp.zeros(2, bool),
                                                jax.random.PRNGKey(0), model=model, sampling=sampling)
  restacked = generate_lib.leave_decode_loop(step(sliced, sliced_state)[0]).cache
  scanned = step(params, state)[0].cache
  for k in ("key", "value"):
    np.testing.assert_allclose(restacked[k], scanned[k], rtol=1e-5, atol=1e-5)


def _greedy_reference(seed):
  """A tiny Qwen2 model, one example and its greedy tokens from full forward passes."""
  cfg = C.tiny("qwen2")
  model = Molmo(cfg)
  ex = _example(cfg, np.random.default_rng(seed), length=9, crops=2)
  params = _params(cfg, ex)
  return model, params, ex, full_forward_greedy(model, params, ex, STEPS)


def test_eos_stops_an_example_and_pads_after_it():
  model, params, ex, ref = _greedy_reference(1)
  eos = int(ref[2])
  first = int(np.argmax(ref == eos))
  out = generate(model, params, ex, SamplingConfig(max_new_tokens=STEPS, eos_id=eos, pad_id=-1))
  assert out.finish_reasons == ["eos"]
  assert out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], ref[:first + 1])
  assert (out.tokens[0, first + 1:] == -1).all()


@pytest.mark.parametrize("family,mesh_shape", [
    ("qwen2", dict(data=2, fsdp=2, tensor=2)),
    ("olmoe", dict(data=2, fsdp=1, tensor=2, expert=2)),
])
def test_generation_on_a_mesh_equals_single_device(family, mesh_shape):
  cfg = C.tiny(family)
  model = Molmo(cfg)
  rng = np.random.default_rng(2)
  exs = [_example(cfg, rng, length=int(rng.integers(4, 12)), crops=int(rng.integers(1, 4)))
         for _ in range(8)]
  batch = _pad_batch(exs, length=12, crops=3)
  params = _params(cfg, exs[0])
  single = generate(model, params, batch, SamplingConfig(max_new_tokens=STEPS))

  mesh = sharding.make_mesh(**mesh_shape)
  target = abstract_params(cfg, mesh)
  sharded = jax.tree.map(lambda p, t: jax.device_put(p, t.sharding), params, target)
  with sharding.activate(mesh):
    sharded_batch = {k: jax.device_put(v, sharding.data_sharding(mesh, v.ndim)) for k, v in batch.items()}
    out = generate(model, sharded, sharded_batch, SamplingConfig(max_new_tokens=STEPS))
  np.testing.assert_array_equal(out.tokens, single.tokens)
  if family == "olmoe":
    spec = target["llm"]["blocks"]["moe"]["gate"].sharding.spec
    assert spec[1] == "expert", spec


def test_sampling_is_reproducible_and_seed_dependent():
  cfg = C.tiny("qwen2")
  model = Molmo(cfg)
  ex = _example(cfg, np.random.default_rng(3), length=8, crops=1)
  params = _params(cfg, ex)
  # Flatten the head so that sampling has real choices to make.
  params = jax.tree.map(lambda x: x, params)
  params["llm"]["lm_head"] = params["llm"]["lm_head"] * 0.01
  sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
  one = generate(model, params, ex, sampling, jax.random.PRNGKey(7)).tokens
  two = generate(model, params, ex, sampling, jax.random.PRNGKey(7)).tokens
  other = generate(model, params, ex, sampling, jax.random.PRNGKey(8)).tokens
  np.testing.assert_array_equal(one, two)
  assert not np.array_equal(one, other)


def test_greedy_tokens_pick_what_argmax_picks_on_ties_infinities_and_nans():
  rng = np.random.default_rng(0)
  # Small integers make ties common; rows of -inf, +inf and NaN at chosen places.
  logits = rng.integers(-3, 4, (12, 4, 37)).astype(np.float32)
  logits[0, 0] = -np.inf
  logits[1, 1, [5, 9]] = np.inf
  logits[2, 2, [7, 20]] = np.nan
  logits[3, 3] = np.nan
  logits[4, 0, 36] = 10.0
  got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
  want = np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1))
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32
  assert got[0, 0] == 0 and got[1, 1] == 5 and got[2, 2] == 7 and got[4, 0] == 36
  assert int(greedy_tokens(jnp.asarray([1.0, 3.0, 3.0]))) == 1


def test_top_k_and_top_p_filter_a_constructed_distribution():
  probs = jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]])
  logits = jnp.log(probs)
  kept = lambda x: np.isfinite(np.asarray(x)) & (np.asarray(x) > -1e30)
  assert kept(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False, False]]
  # Mass before each token: 0, .5, .75, .9, .97 -> top_p=0.8 keeps the first three.
  assert kept(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[True, True, True, False, False]]
  assert kept(filter_logits(logits, top_k=0, top_p=0.1)).tolist() == [[True, False, False, False, False]]
  # Empirical frequencies under top-k=2 follow the renormalised (2/3, 1/3).
  sampling = SamplingConfig(temperature=1.0, top_k=2)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = jax.vmap(lambda k: choose_tokens(logits, k, sampling)[0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=5) / 4000
  assert freq[2:].sum() == 0
  assert abs(freq[0] - 2 / 3) < 0.03
  greedy = choose_tokens(logits, jax.random.PRNGKey(0), dataclasses.replace(sampling, temperature=0.0))
  assert int(greedy[0]) == 0


def test_logprobs_of_the_chosen_tokens_equal_full_forward_log_softmax():
  model, params, ex, ref = _greedy_reference(2)
  eos = int(ref[3])
  plain = generate(model, params, ex, SamplingConfig(max_new_tokens=STEPS, eos_id=eos))
  assert plain.logprobs is None and plain.top_logprobs is None
  out = generate(model, params, ex, SamplingConfig(max_new_tokens=STEPS, eos_id=eos,
                                                   logprobs=True, top_logprobs=3))
  np.testing.assert_array_equal(out.tokens, plain.tokens)       # scoring changes no choice
  n = int(out.lengths[0])
  # Full forward over prompt + generated tokens: log p of each chosen token at its step.
  ids = np.concatenate([ex["input_ids"], out.tokens[:, :n]], axis=1)
  logits = model.apply({"params": params}, dict(ex, input_ids=jnp.asarray(ids)))[0]
  start = ex["input_ids"].shape[1] - 1
  logp = np.asarray(jax.nn.log_softmax(logits[0, start:start + n], axis=-1))
  expected = logp[np.arange(n), out.tokens[0, :n]]
  np.testing.assert_allclose(out.logprobs[0, :n], expected, atol=1e-5)
  assert (out.logprobs[0, n:] == 0).all() and out.logprobs.shape == (1, STEPS)
  # Greedy: the chosen token is the most likely one; the top-3 are sorted and match the full pass.
  np.testing.assert_array_equal(out.top_logprob_ids[0, :n, 0], out.tokens[0, :n])
  np.testing.assert_allclose(out.top_logprobs[0, :n], -np.sort(-logp, axis=-1)[:, :3], atol=1e-5)
  assert out.top_logprob_ids.shape == (1, STEPS, 3) and (out.top_logprob_ids[0, n:] == -1).all()
