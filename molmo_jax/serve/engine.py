"""Dynamic batching: a bounded queue of requests, one worker thread that runs them in batches.

A request waits at most `batch_wait_s` for company: the worker takes the oldest request and
every queued request of the same bucket (prompt-length bucket, crop slots, sampling settings) up
to `max_batch` rows, pads them to a power-of-two batch and decodes them step by step (see
`backend.py`). While a batch runs, new requests queue up and form the next batch, so under load
batches fill without any waiting. Each step's tokens are streamed to their requests; a row whose
request was cancelled (client gone) or ran past its deadline is dropped, and a batch stops when
all its rows are finished.

The queue holds at most `queue_size` waiting requests; beyond that `submit` raises a 503 with
`Retry-After`. Events reach a request through its `sink` callable (called on the worker thread).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from molmo_jax.evals.metrics_counting_pointing import _COUNT_WORDS, parse_count
from molmo_jax.generate import SamplingConfig
from molmo_jax.preprocess import points as points_lib
from molmo_jax.serve.backend import PreparedInput
from molmo_jax.serve.protocol import APIError

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
  text: str
  finish_reason: str                   # stop | length
  token_ids: list[int]
  prompt_tokens: int
  image_size: tuple[int, int] | None
  points: list[list[float]]            # [K, 2] pixels of the original image
  count: int | None


@dataclasses.dataclass
class Delta:
  text: str


@dataclasses.dataclass
class Finished:
  completion: Completion


@dataclasses.dataclass
class Failed:
  error: APIError


@dataclasses.dataclass(eq=False)
class Job:
  """One request inside the engine."""

  prepared: PreparedInput
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  timeout_s: float = 120.0
  stream: bool = True                  # False: only Finished/Failed are delivered (no Delta)
  sink: Callable[[Any], None] = lambda event: None
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  finished: threading.Event = dataclasses.field(default_factory=threading.Event)

  def __post_init__(self):
    self.enqueued = time.monotonic()
    self.deadline = self.enqueued + self.timeout_s

  @property
  def bucket(self) -> tuple:
    sampling = (self.temperature, self.top_p, self.top_k) if self.temperature > 0 else (0.0,)
    return (self.prepared.length_bucket, self.prepared.crop_slots, sampling)

  def cancel(self) -> None:
    self.cancelled.set()

  def emit(self, event: Any) -> None:
    if isinstance(event, Delta) and not self.stream:
      return
    if isinstance(event, (Finished, Failed)):
      if self.finished.is_set():
        return
      self.finished.set()
    try:
      self.sink(event)
    except Exception:   # a closed event loop must not take the worker down
      _log.exception("could not deliver an event to a request")


def timeout_error(job: Job) -> APIError:
  return APIError(504, f"the request did not finish within its {job.timeout_s:g} s timeout",
                  type="timeout", code="timeout")


class _RowText:
  """Incremental text of one row: what may be streamed now, and the final answer.

  The answer is the decoded text without EOS, cut at the first stop string and stripped (as
  `Predictor.predict` returns it). While decoding, text that could still turn into a stop string,
  trailing whitespace and incomplete UTF-8 sequences are held back, so the streamed pieces add up
  to exactly the final answer.
  """

  def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
    self.tokenizer = tokenizer
    self.stop = stop
    self.hold = max((len(s) for s in stop), default=1) - 1
    self.tokens: list[int] = []
    self.sent = ""

  def push(self, tokens: list[int]) -> tuple[str, bool]:
    """Adds tokens; returns (text to stream now, whether a stop string ended the answer)."""
    self.tokens.extend(tokens)
    text, stopped = self._text()
    if stopped:
      return self._delta(text.strip()), True
    visible = text[:len(text) - self.hold] if self.hold else text
    visible = visible.rstrip("\ufffd").strip()
    return self._delta(visible), False

  def finish(self) -> str:
    text, _ = self._text()
    return self._delta(text.strip())

  def final_text(self) -> str:
    return self._text()[0].strip()

  def _text(self) -> tuple[str, bool]:
    eos = self.tokenizer.eos_id
    text = self.tokenizer.decode([t for t in self.tokens if t != eos])
    cut = min((text.find(s) for s in self.stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

  def _delta(self, visible: str) -> str:
    if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
      return ""
    delta, self.sent = visible[len(self.sent):], visible
    return delta


class BatchingEngine:
  def __init__(self, backend: Any, *, max_batch: int = 32, batch_wait_s: float = 0.01,
               queue_size: int = 64, step_bucket: int = 32, retry_after_s: int = 1,
               batch_sizes: Sequence[int] | None = None):
    """batch_sizes: the row counts batches are padded to (each one compiles once per prompt
    bucket); default powers of two up to max_batch. Sizes are rounded up to multiples of the
    mesh's batch-axis size."""
    if max_batch < 1 or queue_size < 1:
      raise ValueError(f"max_batch and queue_size must be >= 1, got {max_batch}, {queue_size}")
    if batch_sizes is None:
      batch_sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    multiple = getattr(backend, "batch_multiple", 1)
    self.batch_sizes = sorted({-(-size // multiple) * multiple
                               for size in [*(b for b in batch_sizes if 0 < b < max_batch), max_batch]})
    self.backend = backend
    self.max_batch = max_batch
    self.batch_wait_s = batch_wait_s
    self.queue_size = queue_size
    self.step_bucket = step_bucket
    self.retry_after_s = retry_after_s
    self._queue: collections.deque[Job] = collections.deque()
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.stats = collections.Counter()
    self.running = 0

  # ---- life cycle -----------------------------------------------------------------------------

  def start(self) -> "BatchingEngine":
    self._thread = threading.Thread(target=self._work, name="molmo-batching", daemon=True)
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
    with self._cond:
      pending, self._queue = list(self._queue), collections.deque()
    for job in pending:
      job.emit(Failed(APIError(503, "the server is shutting down", type="server_error",
                               code="shutting_down")))

  def warmup(self, max_tokens: Sequence[int] = (), inputs: Sequence[PreparedInput] | None = None,
             ) -> int:
    """Compiles what serving will run before any request comes (call before `start`): for each
    of `inputs` (default: the backend's text-only and small-image requests), each batch size and
    each decode length bucket of `max_tokens`, one greedy batch prefills and decodes a chunk.
    Without it the first batch of each new shape compiles while its requests wait. Returns the
    number of batches run."""
    backend = self.backend
    inputs = backend.warmup_inputs() if inputs is None else inputs
    steps_buckets = sorted({-(-m // self.step_bucket) * self.step_bucket for m in max_tokens})
    sampling = SamplingConfig(temperature=0.0, eos_id=backend.tokenizer.eos_id)
    started, runs = time.monotonic(), 0
    # Streamed and unstreamed batches decode chunks of different lengths: both compile, one
    # after the other on the same prefill.
    chunks = sorted({backend.decode_chunk, backend.quiet_chunk})
    for prepared in inputs:
      for steps in steps_buckets:
        for rows in self.batch_sizes:
          run = backend.start([prepared], rows, steps, dataclasses.replace(
              sampling, max_new_tokens=steps), [0])
          left = steps
          for chunk in chunks:
            left -= run.step(np.arange(rows) > 0, np.full(rows, left), chunk).shape[1]
          runs += 1
    _log.info("warm-up: %d batch shapes in %.1f s", runs, time.monotonic() - started)
    return runs

  def snapshot(self) -> dict[str, Any]:
    with self._cond:
      out = {"queued": len(self._queue), "running": self.running, **self.stats}
    compiled = getattr(self.backend, "compiled", None)
    if compiled is not None:
      out["compiled_shapes"] = len(compiled)
    return out

  # ---- requests -------------------------------------------------------------------------------

  def submit(self, job: Job) -> None:
    with self._cond:
      if self._stopping:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
      if len(self._queue) >= self.queue_size:
        self.stats["rejected"] += 1
        raise APIError(503, f"the server is busy ({len(self._queue)} requests queued); retry "
                       f"after {self.retry_after_s} s", type="server_error", code="overloaded",
                       headers={"Retry-After": str(self.retry_after_s)})
      self._queue.append(job)
      self.stats["submitted"] += 1
      self._cond.notify_all()

  # ---- the worker -----------------------------------------------------------------------------

  def _work(self) -> None:
    while True:
      jobs = self._next_batch()
      if jobs is None:
        return
      if not jobs:
        continue
      try:
        self._run(jobs)
      except Exception as e:   # a failed batch fails its requests, never the server
        _log.exception("batch of %d requests failed", len(jobs))
        self.stats["failed_batches"] += 1
        for job in jobs:
          job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                   type="server_error", code="generation_failed")))
      finally:
        with self._cond:
          self.running = 0

  def _next_batch(self) -> list[Job] | None:
    with self._cond:
      while not self._queue and not self._stopping:
        self._cond.wait()
      if self._stopping:
        return None
      first = self._queue[0]
      # Wait for company until the oldest request has waited batch_wait_s (no wait under load:
      # requests that queued during the previous batch are already old enough).
      while not self._stopping:
        same = sum(1 for j in self._queue if j.bucket == first.bucket)
        remaining = first.enqueued + self.batch_wait_s - time.monotonic()
        if same >= self.max_batch or remaining <= 0:
          break
        self._cond.wait(remaining)
      if self._stopping:
        return None
      jobs, rest = [], collections.deque()
      for job in self._queue:
        if job.bucket == first.bucket and len(jobs) < self.max_batch:
          jobs.append(job)
        else:
          rest.append(job)
      self._queue = rest
      self.running = len(jobs)
    now = time.monotonic()
    live = []
    for job in jobs:
      if job.cancelled.is_set():
        self.stats["cancelled"] += 1
      elif now > job.deadline:
        self.stats["timeouts"] += 1
        job.emit(Failed(timeout_error(job)))
      else:
        live.append(job)
    return live

  def _run(self, jobs: list[Job]) -> None:
    backend = self.backend
    tokenizer = backend.tokenizer
    n = len(jobs)
    rows = next(size for size in self.batch_sizes if size >= n)
    longest = max(job.max_tokens for job in jobs)
    steps = -(-longest // self.step_bucket) * self.step_bucket
    first = jobs[0]
    sampling = SamplingConfig(max_new_tokens=steps, eos_id=tokenizer.eos_id)
    if first.temperature > 0:   # greedy ignores top-p/top-k: one compiled program for all greedy
      sampling = dataclasses.replace(sampling, temperature=first.temperature, top_p=first.top_p,
                                     top_k=first.top_k)
    seeds = [job.seed % 2**32 if job.seed is not None else random.getrandbits(31) for job in jobs]
    self.stats["batches"] += 1
    self.stats["batched_requests"] += n
    started = time.monotonic()
    run = backend.start([job.prepared for job in jobs], rows, steps, sampling, seeds)
    chunk = backend.decode_chunk if any(job.stream for job in jobs) else backend.quiet_chunk
    done = np.ones(rows, bool)
    done[:n] = False
    texts = [_RowText(tokenizer, job.stop) for job in jobs]
    while True:
      now = time.monotonic()
      for row, job in enumerate(jobs):
        if done[row]:
          continue
        if job.cancelled.is_set():
          done[row] = True
          self.stats["cancelled"] += 1
        elif now > job.deadline:
          done[row] = True
          self.stats["timeouts"] += 1
          job.emit(Failed(timeout_error(job)))
      if done.all():
        break
      remaining = np.array([job.max_tokens - len(texts[row].tokens) for row, job in enumerate(jobs)]
                           + [0] * (rows - n))
      tokens = run.step(done.copy(), remaining, chunk)
      self.stats["decode_steps"] += tokens.shape[1]
      for row, job in enumerate(jobs):
        if done[row]:
          continue
        new_tokens = []
        for token in tokens[row]:
          if token < 0:
            break
          new_tokens.append(int(token))
          if (token == tokenizer.eos_id
              or len(texts[row].tokens) + len(new_tokens) >= job.max_tokens):
            break
        if not new_tokens:   # never expected; guards against a stuck loop
          self._finish(job, texts[row], "length")
          done[row] = True
          continue
        if not job.stream and not job.stop:   # nothing to stream or to look for in the text:
          texts[row].tokens.extend(new_tokens)  # decoded once, when the row finishes
          delta, stopped = "", False
        else:                                   # one decode of the row's text per chunk
          delta, stopped = texts[row].push(new_tokens)
        if delta:
          job.emit(Delta(delta))
        if stopped or new_tokens[-1] == tokenizer.eos_id:
          self._finish(job, texts[row], "stop")
          done[row] = True
        elif len(texts[row].tokens) >= job.max_tokens:
          self._finish(job, texts[row], "length")
          done[row] = True
    _log.debug("batch of %d (%d rows, %d steps) in %.3f s", n, rows, steps, time.monotonic() - started)

  def _finish(self, job: Job, text: _RowText, reason: str) -> None:
    if job.stream:
      delta = text.finish()
      if delta:
        job.emit(Delta(delta))
    answer = text.final_text()
    size = job.prepared.image_size
    points = (points_lib.parse_points(answer, size).round(2).tolist() if size else [])
    job.emit(Finished(Completion(answer, reason, list(text.tokens), job.prepared.prompt_tokens,
                                 size, points, stated_count(answer))))
    self.stats["completed"] += 1
    self.stats["completion_tokens"] += len(text.tokens)


_COUNT_FORMS = re.compile(
    r"(.*\ba total of [0-9]+.*|(there (are|is) )?none|[0-9]+|" + "|".join(_COUNT_WORDS) + ")",
    re.DOTALL)


def stated_count(answer: str) -> int | None:
  """The number a counting answer states ("Counting the ... shows a total of 3.", "There are
  none.", "3"), else None: unlike `parse_count` (a metric, where the question is known to ask
  for a count), a description that merely ends with a number has no count."""
  normalised = answer.strip().lower().rstrip(".").strip()
  return parse_count(answer) if _COUNT_FORMS.fullmatch(normalised) else None

