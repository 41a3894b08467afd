"""What the batching engine runs: requests -> model examples, and batches -> tokens step by step.

`ModelBackend` wraps a `Predictor` (config, parameters, optional mesh, tokenizer). A batch runs as
one jitted prefill (prompt and vision tower) followed by one jitted `decode_step` per token,
the same two functions `molmo_jax.generate.generate` loops over inside `lax.while_loop`; stepping
from Python lets the engine stream each token, drop rows whose client went away and stop as soon
as every row is finished.

Legend: B batch rows (bucketed), T prompt length (bucketed), M crop slots, S = T + steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from molmo_jax import sharding
from molmo_jax.generate import (DecodeState, SamplingConfig, decode_step, enter_decode_loop,
                                leave_decode_loop, prefill)
from molmo_jax.preprocess import examples, image_io, inputs
from molmo_jax.serve.messages import Conversation
from molmo_jax.serve.protocol import APIError

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedInput:
  example: dict[str, np.ndarray]     # one unpadded inference example (build_example)
  image_size: tuple[int, int] | None  # (w, h) of the original image
  prompt_tokens: int
  length_bucket: int                 # T this example is padded to
  crop_slots: int                    # M crop slots its batch needs


class BatchRun(Protocol):
  def step(self, done: np.ndarray, remaining: np.ndarray, chunk: int) -> np.ndarray:
    """The next tokens of every row, [B, k] with 1 <= k <= chunk: a row stops inside the chunk
    after EOS or after `remaining[row]` tokens, and is -1 from there (and where done[row])."""


class ModelBackend:
  """Batches on the model of a `molmo_jax.predictor.Predictor`.

  `decode_chunk` tokens are decoded per call into the compiled program (a `lax.while_loop` over
  `decode_step`, as in `generate`): one call per token would spend more time dispatching than
  computing on small models, while chunks of a few tokens still stream smoothly and let the
  engine drop cancelled rows between chunks. A batch where no request streams decodes
  `quiet_chunk` tokens per call (fewer dispatches and host round trips; cancelled rows are
  dropped at the same granularity); the engine picks the chunk of each `BatchRun.step`.
  """

  def __init__(self, predictor: Any, decode_chunk: int = 8, prefill_rows: int = 2,
               quiet_chunk: int = 32):
    """prefill_rows: the prompt and vision tower of a batch run this many rows at a time inside
    its one compiled prefill (0 = all rows at once). On CPU a whole batch of 32 image requests
    at once costs more per row than two at a time (its activations no longer fit the caches)."""
    if decode_chunk < 1 or quiet_chunk < 1:
      raise ValueError(f"decode_chunk and quiet_chunk must be >= 1, got {decode_chunk}, {quiet_chunk}")
    if prefill_rows < 0:
      raise ValueError(f"prefill_rows must be >= 0, got {prefill_rows}")
    self.decode_chunk = decode_chunk
    self.quiet_chunk = quiet_chunk
    self.prefill_rows = prefill_rows
    self.compiled: set[tuple] = set()   # shapes the jitted functions have been called with
    self.predictor = predictor
    self.tokenizer = predictor.tokenizer
    self.config = predictor.config
    self.max_crops = predictor.max_crops
    self.length_bucket = predictor.length_bucket
    self.context_length = predictor.config.llm.rope_max_length
    self.mesh = predictor.mesh
    if self.mesh is None:
      self.batch_multiple = 1
    else:
      axes = sharding.data_sharding(self.mesh, 1).spec[0] or ()
      axes = (axes,) if isinstance(axes, str) else axes
      self.batch_multiple = math.prod(self.mesh.shape[a] for a in axes)

  # ---- requests -> examples -------------------------------------------------------------------

  def prepare(self, conversation: Conversation) -> PreparedInput:
    """One request's conversation and image as a model example, built by
    `molmo_jax.preprocess.inputs` as for `Predictor` (several turns: the same image
    preparation, then `build_example` over the whole conversation)."""
    image = None
    if conversation.image is not None:
      source = conversation.image
      try:
        image = inputs.load_pixels(source.data, self.config, name=source.param)
      except image_io.ImageLoadError as e:
        raise APIError(400, f"invalid image: {e}", param=source.param, code="invalid_image") from e
    try:
      if len(conversation.turns) == 1:
        example, size = inputs.build_inference_example(
            image, conversation.turns[0], self.tokenizer, self.config, max_crops=self.max_crops)
      else:
        cut = inputs.prepare_images(image, self.config, self.max_crops)
        example = examples.build_example(conversation.turns, cut, self.tokenizer, self.config,
                                         for_training=False)
        size = cut[0].original_size if cut else None
    except ValueError as e:
      raise APIError(400, f"messages: {e}", param="messages") from e
    crops = example["images"].shape[0]
    length = len(example["input_ids"])
    # Image requests use the predictor's crop slots (max_crops + 1, so answers equal
    # `Predictor.predict`'s); text-only requests need one (empty) slot.
    slots = self.max_crops + 1 if crops else 1
    return PreparedInput(example, size, length, inputs.bucket_length(length, self.length_bucket),
                         slots)

  # ---- batches -> tokens ----------------------------------------------------------------------

  def start(self, inputs: list[PreparedInput], rows: int, steps: int, sampling: SamplingConfig,
            seeds: list[int]) -> BatchRun:
    """Pads `inputs` to `rows` rows (copies of the first; the caller marks them done) and runs
    the prefill."""
    padded = inputs + [inputs[0]] * (rows - len(inputs))
    seq_len = max(p.length_bucket for p in padded)
    slots = max(p.crop_slots for p in padded)
    batch = examples.collate([p.example for p in padded], seq_len, slots - 1)
    # One call for all rows' keys (a PRNGKey call per row costs ~4 ms of dispatch each on CPU).
    keys = np.asarray(_keys_from_seeds(np.asarray(seeds + [0] * (rows - len(seeds)), np.uint32)))
    self._note_shape(("prefill", rows, seq_len, slots, steps))
    return _ModelRun(self, batch, keys, steps, sampling)

  def _note_shape(self, key: tuple) -> None:
    """Counts the shapes the jitted functions see: a new one is a compilation (logged, and
    counted in /health), which under load should only ever happen during warm-up."""
    if key not in self.compiled:
      self.compiled.add(key)
      _log.info("compiling %s for %s", key[0], key[1:])

  def warmup_inputs(self, kinds: tuple[str, ...] = ("text", "image")) -> list[PreparedInput]:
    """A text-only ("text") and a small-image ("image") request: warming up with them compiles
    the prompt buckets of short text questions and of images that need few crops."""
    from molmo_jax.serve.messages import Conversation, ImageSource
    unknown = set(kinds) - {"text", "image"}
    if unknown:
      raise ValueError(f"warm-up kinds must be text or image, got {sorted(unknown)}")
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image, "PNG")
    sources = {"text": None, "image": ImageSource(image.getvalue(), "warmup")}
    return [self.prepare(Conversation(["Describe this image."], sources[k])) for k in kinds]

  def _prefill_fn(self, steps: int, rows: int):
    r = self.prefill_rows
    per_pass = r if 0 < r < rows and rows % r == 0 and self.mesh is None else 0
    return self._prefill_jit(steps, per_pass)

  @functools.lru_cache(maxsize=16)
  def _prefill_jit(self, steps: int, rows_per_pass: int):
    return jax.jit(functools.partial(prefill, model=self.predictor.model, steps=steps,
                                     rows_per_pass=rows_per_pass))

  @functools.lru_cache(maxsize=16)
  def _chunk_fn(self, sampling: SamplingConfig, chunk: int):
    return jax.jit(functools.partial(decode_chunk, model=self.predictor.model, sampling=sampling,
                                     chunk=chunk), donate_argnums=(1,))


@jax.jit
def _keys_from_seeds(seeds: jax.Array) -> jax.Array:
  """[B] seeds -> [B, 2] PRNG keys, each equal to jax.random.PRNGKey(seed)."""
  return jax.vmap(jax.random.PRNGKey)(seeds)


def decode_chunk(params: Any, state: DecodeState, slot: jax.Array, index: jax.Array,
                 done: jax.Array, remaining: jax.Array, keys: jax.Array, *, model: Any,
                 sampling: SamplingConfig, chunk: int) -> tuple[DecodeState, jax.Array, jax.Array]:
  """Up to `chunk` decode steps from cache slot `slot` (= T + tokens so far, `index`): tokens
  [B, chunk], -1 once a row is done (EOS, its `remaining` budget [B] used up, or done [B] on
  entry), and the number of steps run. Row r's step i draws with fold_in(keys[r], index + i), so
  sampling does not depend on the batch or the chunking."""
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  tokens = jnp.full((done.shape[0], chunk), -1, jnp.int32)

  def cond(loop):
    i, _, _, done, _ = loop
    return (i < chunk) & ~jnp.all(done)

  def body(loop):
    i, state, tokens, done, remaining = loop
    rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, index + i)
    state, token = decode_step(params, state, slot + i, done, rngs, model=model, sampling=sampling)
    token = jnp.where(done, -1, token)
    remaining = remaining - (~done).astype(jnp.int32)
    done = done | (token == eos) | (remaining <= 0)
    return i + 1, state, tokens.at[:, i].set(token), done, remaining

  params, state = enter_decode_loop(params, state, model)
  steps, state, tokens, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), state, tokens, done, remaining))
  return leave_decode_loop(state), tokens, steps


class _ModelRun:
  def __init__(self, backend: ModelBackend, batch: dict[str, np.ndarray], keys: np.ndarray,
               steps: int, sampling: SamplingConfig):
    self.backend = backend
    self.cache_length = batch["input_ids"].shape[1] + steps
    self.params = backend.predictor.params
    self.prompt_length = batch["input_ids"].shape[1]
    self.index = 0
    self.sampling = sampling
    keys_needed = ("input_ids", "images", "image_masks", "image_input_idx", "position_ids")
    batch = {k: batch[k] for k in keys_needed if k in batch}
    with self._context():
      if backend.mesh is not None:
        batch = {k: jax.device_put(v, sharding.data_sharding(backend.mesh, v.ndim))
                 for k, v in batch.items()}
        keys = jax.device_put(keys, sharding.data_sharding(backend.mesh, 2))
      self.keys = jnp.asarray(keys)
      self.state = backend._prefill_fn(steps, len(keys))(self.params, batch)

  def _context(self):
    if self.backend.mesh is None:
      return contextlib.nullcontext()
    return sharding.activate(self.backend.mesh)

  def step(self, done: np.ndarray, remaining: np.ndarray, chunk: int) -> np.ndarray:
    self.backend._note_shape(("decode", len(done), self.cache_length, self.sampling, chunk))
    with self._context():
      # numpy arguments go to the compiled program directly (jnp.* here would each be an eager
      # dispatch).
      self.state, tokens, steps = self.backend._chunk_fn(self.sampling, chunk)(
          self.params, self.state, np.int32(self.prompt_length + self.index),
          np.int32(self.index), np.asarray(done), np.asarray(remaining, np.int32), self.keys)
      tokens, steps = jax.device_get((tokens, steps))
    self.index += int(steps)
    return np.asarray(tokens)[:, :max(int(steps), 1)]
