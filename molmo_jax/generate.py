"""Batched generation with a KV cache: one jitted prefill + `lax.while_loop` decode.

Legend: B batch, T prompt length (bucketed), S = T + max_new_tokens cache slots, V vocabulary,
N crops, P patches, Q pooled cells.

Prompts are right-padded with -1 as the reference collator does. Slot s of the cache holds the
prompt token s (s < T) or generated token s - T. A key slot is attended iff it holds a real token
and comes no later than the query. Positions continue from each example's last valid prompt
token, so padding never shifts RoPE phases (the reference's olmo/model.py (generate)). The vision tower runs once, inside the
prefill.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax.models.decoder import init_cache
from molmo_jax.models.layers import constrain
from molmo_jax.models.molmo import Molmo, default_positions
from molmo_jax.quantize import param_bytes

Array = jax.Array


# The paper's budget for pointing and counting answers (a dozen points); the CLI uses it too.
DEFAULT_MAX_NEW_TOKENS = 192


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Greedy when temperature == 0; otherwise temperature / top-k / top-p sampling."""

  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
  temperature: float = 0.0
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1.0 = off
  eos_id: int | None = None
  pad_id: int = -1          # written after EOS
  # Return the log-probability of every chosen token (log-softmax of the model's logits, before
  # temperature / top-k / top-p), and of the `top_logprobs` most likely tokens at every step.
  logprobs: bool = False
  top_logprobs: int = 0


@dataclasses.dataclass
class GenerationOutput:
  """Legend: B batch, N = max_new_tokens, n = top_logprobs."""

  tokens: np.ndarray          # [B, N] int32, pad_id after the end
  lengths: np.ndarray         # [B] tokens generated, EOS included
  finish_reasons: list[str]   # "eos" | "length" (| "stop" once stop strings are applied)
  # With SamplingConfig.logprobs / top_logprobs (else None); 0 / pad_id after the end.
  logprobs: np.ndarray | None = None          # [B, N] float32 log p(chosen token)
  top_logprobs: np.ndarray | None = None      # [B, N, n] float32, most likely first
  top_logprob_ids: np.ndarray | None = None   # [B, N, n] int32


def _step_logprobs(logits: Array, token: Array, top: int) -> tuple[Array, Array, Array]:
  """logits [B, V], token [B] -> log p(token) [B], top-n log-probs [B, n] and their ids [B, n]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, jnp.maximum(token, 0)[:, None], axis=-1)[:, 0]
  if top:
    values, ids = jax.lax.top_k(logp, top)
  else:
    values, ids = jnp.zeros((logits.shape[0], 0), jnp.float32), jnp.zeros((logits.shape[0], 0),
                                                                          jnp.int32)
  return chosen, values, ids.astype(jnp.int32)


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
  """Masks logits [B, V] outside the top-k set and outside the top-p nucleus with -inf."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (so the top token always stays).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return logits


def greedy_tokens(logits: Array) -> Array:
  """logits [..., V] -> [...] int32: jnp.argmax over the vocabulary (the first index of the
  maximum; a NaN counts as the maximum), computed as a max and a min over indices.

  Two plain reductions instead of argmax's variadic (value, index) one, which XLA:CPU runs
  slowly: 16 rows x 32000 vocabulary 2.4 -> 0.26 ms on one core, a tenth of a batch-16 decode
  step of `benchmarks/generate.py`'s model."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  hit = (logits == top) | jnp.isnan(logits)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def choose_tokens(logits: Array, rng: Array, sampling: SamplingConfig) -> Array:
  """logits [B, V] float32 -> next tokens [B] int32.

  `rng` is one key for the whole batch, or one key per row ([B, 2]) so that a row's draws do not
  depend on which other rows share its batch (the server's per-request seeds).
  """
  if sampling.temperature <= 0:
    return greedy_tokens(logits)
  logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
  if rng.ndim == 2:
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
  """What one decoding step needs: the KV cache, which cache slots hold tokens, the logits that
  choose the next token and that token's position."""

  cache: Any              # key/value [L, B, K, S, h] (inside a decode loop on CPU: L such dicts
                          # of [B, K, S, h], see enter_decode_loop)
  key_valid: Array        # [B, S] bool
  next_logits: Array      # [B, V] float32
  next_position: Array    # [B] int32


# KV cache [L, B, K, S, h]: batch and kv heads split like the attention's keys (a no-op without
# an active mesh). Pinned at creation and after every write, so the loops carry it sharded.
CACHE_AXES = (None, "activation_batch", "activation_kv_heads", None, "activation_head_dim")


def _constrain_cache(cache: dict, axes: tuple = CACHE_AXES) -> dict:
  return {k: constrain(v, axes) for k, v in cache.items()}


def prefill(params: Any, batch: Mapping[str, Array], *, model: Molmo, steps: int,
            rows_per_pass: int = 0) -> DecodeState:
  """Runs the prompt (and the vision tower) once into a cache with room for `steps` new tokens.

  Only the last prompt position's logits are computed (the LM head alone on [B, 1, D]); the
  prompt's [B, T, V] logits never exist. The prompt attends over its own T slots (the `steps`
  empty slots would only be masked out: with the default 192 new tokens and short prompts they
  were most of the attention's work), and the cache is then padded to S = T + steps slots.
  rows_per_pass: prefill this many rows at a time (0 = all): a pass's attention scores are
  [rows, H, T, T], so a few rows per pass keep long, big batches small while the cache still
  fills for the whole batch.
  """
  input_ids = batch["input_ids"]
  b, t = input_ids.shape
  cfg = model.config
  cache = _constrain_cache(init_cache(cfg.llm, b, t, jnp.dtype(cfg.dtype)))
  valid = input_ids != -1
  key_valid = jnp.concatenate([valid, jnp.zeros((b, steps), bool)], axis=1)        # [B, S]
  slots = jnp.arange(t, dtype=jnp.int32)

  positions = batch.get("position_ids")
  if positions is None:
    positions = default_positions(input_ids)
  mask = valid[:, None, :] & (slots[None, None, :] <= slots[None, :, None])          # [B, T, T]
  last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)                                  # [B]
  rows = jnp.arange(b)
  inputs = dict(batch, position_ids=positions)
  if not rows_per_pass or rows_per_pass >= b:
    _, out = model.apply({"params": params}, inputs, cache=cache, cache_index=jnp.int32(0),
                         attention_mask=mask)
    cache, hidden = out["cache"], out["hidden"][rows, last]
  else:
    cache, hidden = _prefill_in_passes(params, inputs, cache, mask, last, model, rows_per_pass)
  room = ((0, 0), (0, 0), (0, 0), (0, steps), (0, 0))          # [L, B, K, T, h] -> [L, B, K, S, h]
  cache = _constrain_cache({k: jnp.pad(v, room) for k, v in cache.items()})
  logits = model.apply({"params": params}, hidden[:, None], method="lm_logits")[:, 0]
  return DecodeState(cache, key_valid, logits.astype(jnp.float32), positions[rows, last] + 1)


def _prefill_in_passes(params: Any, inputs: Mapping[str, Array], cache: dict, mask: Array,
                       last: Array, model: Molmo, r: int) -> tuple[dict, Array]:
  """prefill's row passes -> (cache [L, B, K, T, h], last prompt positions' hidden [B, D])."""
  b = inputs["input_ids"].shape[0]
  if b % r:
    raise ValueError(f"prefill rows_per_pass {r} must divide the batch size {b}")
  take = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, r, axis=0)

  def one_pass(g, carry):
    cache, hidden = carry
    start = g * r
    piece = {k: take(v, start) for k, v in inputs.items()}
    small = _constrain_cache({k: jnp.zeros((v.shape[0], r) + v.shape[2:], v.dtype)
                              for k, v in cache.items()})
    _, out = model.apply({"params": params}, piece, cache=small, cache_index=jnp.int32(0),
                         attention_mask=take(mask, start))
    cache = _constrain_cache({k: jax.lax.dynamic_update_slice_in_dim(cache[k], out["cache"][k],
                                                                    start, axis=1) for k in cache})
    h = out["hidden"][jnp.arange(r), take(last, start)]
    return cache, jax.lax.dynamic_update_slice_in_dim(hidden, h, start, axis=0)

  hidden0 = jnp.zeros((b, model.config.llm.d_model), jnp.dtype(model.config.dtype))
  return jax.lax.fori_loop(0, b // r, one_pass, (cache, hidden0))


def decode_step(params: Any, state: DecodeState, slot: Array, done: Array, rng: Array, *,
                model: Molmo, sampling: SamplingConfig) -> tuple[DecodeState, Array]:
  """Chooses each row's next token [B] (pad_id where `done`) and runs it into cache slot `slot`
  (= prompt length T + step index), giving the logits for the token after it.

  params: the model's parameters, or `LayerSlices` (see `enter_decode_loop`), whose state then
  holds per-layer caches."""
  token = choose_tokens(state.next_logits, rng, sampling)
  token = jnp.where(done, sampling.pad_id, token)
  key_valid = state.key_valid.at[:, slot].set(True)
  slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  mask = key_valid[:, None, :] & (slots[None, None, :] <= slot)
  ids, positions = jnp.where(token < 0, 0, token)[:, None], state.next_position[:, None]
  if isinstance(params, LayerSlices):
    step_logits, caches = model.apply({"params": params.params}, ids, positions, mask,
                                      params.layers, state.cache, slot, params.lm_head_t,
                                      method="decode_with_layer_slices")
    cache = tuple(_constrain_cache(c, CACHE_AXES[1:]) for c in caches)
  else:
    step_logits, out = model.apply({"params": params}, {"input_ids": ids, "position_ids": positions},
                                   cache=state.cache, cache_index=slot, attention_mask=mask)
    cache = _constrain_cache(out["cache"])
  new_state = DecodeState(cache, key_valid, step_logits[:, 0].astype(jnp.float32),
                          state.next_position + 1)
  return new_state, token


class LayerSlices(NamedTuple):
  """Decode-loop parameters: the model's parameters and, separately, each decoder layer's slice
  of the stacked ("blocks") ones.

  XLA:CPU's matmul kernels cannot read one layer of a stacked weight in place, so a decode step
  run through the layer scan copies every layer's weights out of the stack for every token
  (loop-invariant code motion does not hoist copies). Sliced once before the loop, the layers'
  weights are separate buffers the loop only reads: 4-layer width-512 decoder, 1 core, 42.1 ->
  32.3 ms per step at 16 rows and 13.5 -> 5.5 ms at one row (per-layer caches included).
  Accelerators read slices in place and keep the scan (the slices would double the decoder's
  weight memory there).
  """

  params: Any
  layers: tuple
  # The LM head transposed, [V_emb, D], when a step decodes several rows (Decoder.lm_logits:
  # 16 rows of a 32000-token vocabulary, 1 core, 12.9 -> 9.6 ms); None for one row, where h @ W
  # is the faster product.
  lm_head_t: Any = None


# Above this many bytes of stacked decoder weights the decode loop keeps the scan on CPU too:
# the slices are a second copy of the layers' weights while the loop runs.
LAYER_SLICES_MAX_BYTES = 4 << 30


def _platform() -> str:
  """The platform being compiled for: the active mesh's (an ahead-of-time TPU compile runs on a
  CPU host), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None) if not mesh.empty else None
  return getattr(device, "platform", None) or jax.default_backend()


def _use_layer_slices(params: Any, model: Any) -> bool:
  if type(model) is not Molmo or _platform() != "cpu":
    return False     # quantized / LoRA models wrap the module and see stacked weights
  blocks = params.get("llm", {}).get("blocks") if isinstance(params, Mapping) else None
  if blocks is None:
    return False
  return param_bytes(blocks) <= LAYER_SLICES_MAX_BYTES


def enter_decode_loop(params: Any, state: DecodeState, model: Any) -> tuple[Any, DecodeState]:
  """(params, state) for a loop of `decode_step`s, traced just before the loop: on CPU the
  layers' weights and KV caches split into per-layer buffers (`LayerSlices`; the caches
  [L, B, K, S, h] -> L dicts [B, K, S, h], each then updated in place); elsewhere unchanged.
  `leave_decode_loop` restacks the caches."""
  if not _use_layer_slices(params, model):
    return params, state
  num_layers = model.config.llm.num_layers
  layers = tuple(jax.tree.map(lambda x, i=i: x[i], params["llm"]["blocks"])
                 for i in range(num_layers))
  rows = state.next_logits.shape[0]
  lm_head_t = params["llm"]["lm_head"].T if rows > 1 else None
  caches = tuple(_constrain_cache({k: v[i] for k, v in state.cache.items()}, CACHE_AXES[1:])
                 for i in range(num_layers))
  return LayerSlices(params, layers, lm_head_t), state._replace(cache=caches)


def leave_decode_loop(state: DecodeState) -> DecodeState:
  """The inverse of `enter_decode_loop` for the state: caches back to key/value [L, B, K, S, h]."""
  if isinstance(state.cache, Mapping):
    return state
  return state._replace(cache=_constrain_cache(
      {k: jnp.stack([c[k] for c in state.cache]) for k in state.cache[0]}))


def _generate(params: Any, batch: Mapping[str, Array], rng: Array, *, model: Molmo,
              sampling: SamplingConfig, prefill_rows_per_pass: int = 0
              ) -> tuple[Array, Array, Array]:
  b, t = batch["input_ids"].shape
  steps = sampling.max_new_tokens
  state = prefill(params, batch, model=model, steps=steps, rows_per_pass=prefill_rows_per_pass)
  params, state = enter_decode_loop(params, state, model)
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  tokens = jnp.full((b, steps), sampling.pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  lengths = jnp.zeros((b,), jnp.int32)
  top = sampling.top_logprobs
  with_logprobs = sampling.logprobs or top > 0
  # Per-step log-probs ride in the loop state only when asked for (else empty arrays).
  scores = (jnp.zeros((b, steps if with_logprobs else 0), jnp.float32),
            jnp.zeros((b, steps if top else 0, top), jnp.float32),
            jnp.full((b, steps if top else 0, top), sampling.pad_id, jnp.int32))

  def cond(loop):
    i, *_, done, _, _ = loop
    return (i < steps) & ~jnp.all(done)

  def body(loop):
    i, state, tokens, lengths, done, rng, scores = loop
    rng, step_rng = jax.random.split(rng)
    logits = state.next_logits
    state, token = decode_step(params, state, t + i, done, step_rng, model=model, sampling=sampling)
    if with_logprobs:
      chosen, values, ids = _step_logprobs(logits, token, top)
      live = ~done
      scores = (scores[0].at[:, i].set(jnp.where(live, chosen, 0.0)),
                scores[1].at[:, i].set(jnp.where(live[:, None], values, 0.0)) if top else scores[1],
                scores[2].at[:, i].set(jnp.where(live[:, None], ids, sampling.pad_id))
                if top else scores[2])
    tokens = tokens.at[:, i].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == eos)
    return i + 1, state, tokens, lengths, done, rng, scores

  _, _, tokens, lengths, done, _, scores = jax.lax.while_loop(
      cond, body, (jnp.int32(0), state, tokens, lengths, done, rng, scores))
  return tokens, lengths, done, scores


@functools.lru_cache(maxsize=32)
def _compiled(model: Molmo, sampling: SamplingConfig):
  return jax.jit(functools.partial(_generate, model=model, sampling=sampling))


def generate(model: Molmo, params: Any, batch: Mapping[str, Any], sampling: SamplingConfig,
             rng: Array | None = None) -> GenerationOutput:
  """Generates for a right-padded batch (see molmo_jax.preprocess.inputs.build_batch).

  The compiled function is cached per (model config, sampling config) and input shapes; bucket
  prompt lengths (molmo_jax.preprocess.inputs.bucket_length) to keep the number of compilations
  small. Params may be sharded over a mesh: run inside `molmo_jax.sharding.activate(mesh)`.
  """
  keys = ("input_ids", "images", "image_masks", "image_input_idx", "position_ids")
  batch = {k: jnp.asarray(batch[k]) for k in keys if batch.get(k) is not None}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  tokens, lengths, done, scores = _compiled(model, sampling)(params, batch, rng)
  tokens, lengths, done, scores = jax.device_get((tokens, lengths, done, scores))
  reasons = ["eos" if d else "length" for d in done]
  logprobs, top_values, top_ids = (np.asarray(x) for x in scores)
  with_logprobs = sampling.logprobs or sampling.top_logprobs > 0
  return GenerationOutput(np.asarray(tokens), np.asarray(lengths), reasons,
                          logprobs=logprobs if with_logprobs else None,
                          top_logprobs=top_values if sampling.top_logprobs else None,
                          top_logprob_ids=top_ids if sampling.top_logprobs else None)


def full_forward_greedy(model: Molmo, params: Any, batch: Mapping[str, Any], steps: int) -> np.ndarray:
  """Reference decoding without a cache: re-runs the whole sequence for every token (tests only).

  Works on a batch of ONE unpadded example. The sequence lives in a fixed buffer right-padded with
  -1 (padding keys are masked and do not shift positions), so this compiles once.
  """
  batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
  ids = batch["input_ids"]
  length = ids.shape[1]
  buffer = jnp.concatenate([ids, jnp.full((1, steps), -1, jnp.int32)], axis=1)

  @jax.jit
  def next_token(params, buffer, position):
    logits = model.apply({"params": params}, dict(batch, input_ids=buffer))[0]
    return jnp.argmax(logits[0, position]).astype(jnp.int32)   # the plain form: a reference

  out = []
  for i in range(steps):
    token = next_token(params, buffer, length - 1 + i)
    out.append(int(token))
    buffer = buffer.at[0, length + i].set(token)
  return np.asarray(out, np.int32)
