"""Training and evaluation input pipelines: mixture, shuffling, pre-processing, batching (grain).

Legend: G = global batch, B = local (per-process) batch = G / process_count, S = seq_len,
M = max_crops + 1 crop slots, P = patches per crop, C = patch_size^2 * 3, Q = pooled cells per crop.

Training stream. Position k = 0, 1, 2, ... of one endless stream (shared by all processes) maps
to a record by a pure function (`molmo_jax.data.mixture.MixturePlan`). Process p of P reads
positions p, p + P, p + 2P, ... (disjoint; together they cover the stream).

Grain graph (one per process):
  range(p + P * next_index, inf, P) -> map(record -> image load -> multicrop -> build_example ->
  pad to fixed shapes)  [in `num_workers` processes via mp_prefetch, else in-process]
  -> filter(examples that overflow seq_len / M and cannot be truncated) -> batch(B)
Filtering happens after the workers and before batching, so every batch has exactly B rows and
the output does not depend on num_workers. The iterator state is the next local stream index
after the last row of the last batch (plus a fingerprint of the stream): a JSON dict that
resumes exactly at the next batch, with any number of workers.

Batches: input_ids, target_ids, subsegment_ids, position_ids [B, S] int32 (-1 padding),
loss_weights [B, S] float32 (0 padding), images [B, M, P, C] float32, image_masks [B, M, P]
float32, image_input_idx [B, M, Q] int32 (crop slots of all -1 are absent, the reference's olmo/data/collator.py).
Evaluation batches (`make_eval_batches`) add valid [B] bool, source_index and record_index [B]
int32 (-1 on padding rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from molmo_jax.config import MolmoConfig, PreprocessConfig
from molmo_jax.data.mixture import MixturePlan, mixture_rates
from molmo_jax.data.sources import RecordError, SourceConfig, open_source
from molmo_jax.preprocess.examples import (IMAGE_KEYS, IMAGE_TOKENS_END, OVERFLOW_POLICIES,
                                           TEXT_KEYS, build_example, collate)
from molmo_jax.preprocess.image import multicrop_image
from molmo_jax.preprocess.inputs import load_pixels
from molmo_jax.preprocess.tokens import MolmoTokenizer

_log = logging.getLogger(__name__)
_STATE_VERSION = 1
_POSITION = "_stream_index"            # internal per-row key, removed before batches are returned
_ALONE = "_alone"                      # internal: the example's source does not pack
_EXAMPLE_SALT = 0x657861


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a training (or evaluation) input pipeline reads and how.

  Attributes:
    sources: the mixture's sources (see `SourceConfig`).
    group_rates: {group: rate}; with it, rates within a group follow the sources' explicit rates
      or the sqrt(size) rule, then are scaled by the group's rate (the reference's launch_scripts/train_multitask_model.py and train_captioner.py).
    seq_len: S, tokens per row.
    max_crops: high-res crops per image (M = max_crops + 1); None takes the model's.
    global_batch_size: G rows per step over all processes.
    seed: data seed (mixture draws, shuffling, per-example randomness).
    shuffle: shuffle every source, with a new permutation each epoch.
    on_overflow: "drop" | "error" | "truncate_text" for examples longer than S or with more
      crops than M (see `collate`).
    pack_conversations: pack all conversations of a record into one example (the reference's olmo/data/model_preprocessor.py (several conversations per image)); when
      False one conversation is drawn at random per example.
    max_conversations: pack at most this many (drawn at random); 0 = all.
    root_subsegment_weighting: scale loss weights by sqrt(1/n) for n packed conversations.
    num_workers: pre-processing processes (grain mp_prefetch); 0 runs it in-process.
    prefetch: examples each worker prepares ahead.
    pack_examples: pack several examples (each with its images) into one row (data/packing.py):
      rows gain segment_ids [B, S] and attention stays within an example. A source with
      `pack=False` keeps a row per example.
    pack_bins: rows kept open by the packer (best fit, fullest row out; data/packing.py).
    pack_crop_slots: crop slots of a packed row (images [B, pack_crop_slots, P, C]); None keeps
      max_crops + 1, so only examples whose crops fit together share a row.
  """

  sources: tuple[SourceConfig, ...]
  group_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
  seq_len: int = 2304
  max_crops: int | None = None
  global_batch_size: int = 256
  seed: int = 0
  shuffle: bool = True
  on_overflow: str = "drop"
  pack_conversations: bool = True
  max_conversations: int = 0
  root_subsegment_weighting: bool = True
  num_workers: int = 0
  prefetch: int = 2
  pack_examples: bool = False
  pack_bins: int = 16
  pack_crop_slots: int | None = None

  def __post_init__(self):
    if not self.sources:
      raise ValueError("DataConfig.sources: at least one source is needed")
    names = [s.name for s in self.sources]
    if len(set(names)) != len(names):
      raise ValueError(f"DataConfig.sources: names must be unique, got {names}")
    if self.on_overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"DataConfig.on_overflow must be one of {OVERFLOW_POLICIES}, got "
                       f"{self.on_overflow!r}")
    for field in ("seq_len", "global_batch_size"):
      if getattr(self, field) < 1:
        raise ValueError(f"DataConfig.{field} must be >= 1, got {getattr(self, field)}")
    for field in ("num_workers", "max_conversations", "seed"):
      if getattr(self, field) < 0:
        raise ValueError(f"DataConfig.{field} must be >= 0, got {getattr(self, field)}")
    if self.max_crops is not None and self.max_crops < 1:
      raise ValueError(f"DataConfig.max_crops must be >= 1 or None, got {self.max_crops}")
    if self.pack_bins < 1:
      raise ValueError(f"DataConfig.pack_bins must be >= 1, got {self.pack_bins}")
    if self.pack_crop_slots is not None and self.pack_crop_slots < 1:
      raise ValueError(f"DataConfig.pack_crop_slots must be >= 1 or None, got {self.pack_crop_slots}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
    """From a plain dict or an ml_collections ConfigDict; sources as a list of dicts, or as
    {name: fields} (which command lines can override one field at a time)."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"DataConfig: unknown field(s) {unknown}; known: {sorted(known)}")
    sources = d.get("sources", ())
    if isinstance(sources, Mapping):
      sources = [{"name": name, **dict(fields)} for name, fields in sources.items()]
    d["sources"] = tuple(s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s)
                         for s in sources)
    d["group_rates"] = dict(d.get("group_rates") or {})
    return cls(**d)


# --------------------------------------------------------------------------------------------
# One record -> one fixed-shape example
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ExampleSpec:
  pre: PreprocessConfig
  seq_len: int
  max_crops: int
  on_overflow: str
  pack_conversations: bool
  max_conversations: int
  root_subsegment_weighting: bool


def record_to_example(record: Mapping[str, Any], source_cfg: SourceConfig, tok: MolmoTokenizer,
                      spec: _ExampleSpec, for_training: bool, rng: Any) -> dict[str, np.ndarray]:
  """Image load -> multicrop -> build_example for one record (unpadded arrays)."""
  conversations = record["conversations"]
  if for_training:
    conversations = _choose_conversations(conversations, spec, rng)
  else:
    conversations = conversations[0][:-1]   # the prompt: the first conversation minus its answer
  images = None
  if record.get("image") is not None:
    pixels = load_pixels(record["image"], spec.pre)
    images = [multicrop_image(pixels, spec.pre, max_crops=spec.max_crops)]
  return build_example(conversations, images, tok, spec.pre, for_training=for_training, rng=rng,
                       style=record.get("style") or source_cfg.style, weight=record.get("weight"),
                       message_format=source_cfg.message_format,
                       root_subsegment_weighting=spec.root_subsegment_weighting)


def record_location(source: Any, name: str, index: int, context: str) -> str:
  """`file:line (source 'name', context)` for manifest records, else `source 'name' record i`."""
  locate = getattr(source, "where", None)
  if locate is not None:
    return f"{locate(index)} (source {name!r}, {context})"
  return f"source {name!r} record {index} ({context})"


def _choose_conversations(conversations: list[list[str]], spec: _ExampleSpec, rng) -> list:
  if not spec.pack_conversations:
    return conversations[int(rng.integers(len(conversations)))]
  if spec.max_conversations and len(conversations) > spec.max_conversations:
    keep = rng.choice(len(conversations), spec.max_conversations, replace=False)
    conversations = [conversations[i] for i in sorted(keep)]
  return conversations


def fit_example(ex: dict[str, np.ndarray], spec: _ExampleSpec, where: str) -> dict | None:
  """Pads one example to [S] / [M, ...]; None when it overflows and must be dropped."""
  too_long = len(ex["input_ids"]) > spec.seq_len
  too_many_crops = ex["images"].shape[0] > spec.max_crops + 1
  policy = spec.on_overflow
  if too_long and policy == "truncate_text" and ex[IMAGE_TOKENS_END] <= spec.seq_len:
    too_long = False   # collate cuts the text after the image blocks
  if too_long or too_many_crops:
    message = (f"{where}: {len(ex['input_ids'])} tokens / {ex['images'].shape[0]} crops do not fit "
               f"seq_len {spec.seq_len} / max_crops + 1 = {spec.max_crops + 1}")
    if policy == "error":
      raise ValueError(message + "; set on_overflow='drop' or 'truncate_text', or a longer seq_len")
    _log.info("dropping %s", message)
    return None
  padded = collate([ex], spec.seq_len, spec.max_crops, on_overflow=policy)
  return {k: v[0] for k, v in padded.items()}


def empty_row(keys: Sequence[str], spec: _ExampleSpec) -> dict[str, np.ndarray]:
  """A padding row: every value -1 (loss weights 0), the shapes of a fitted example."""
  pre = spec.pre
  shapes = {"images": (spec.max_crops + 1, pre.crop_patches ** 2, pre.patch_size ** 2 * 3),
            "image_masks": (spec.max_crops + 1, pre.crop_patches ** 2),
            "image_input_idx": (spec.max_crops + 1, pre.pooled_per_crop)}
  row = {}
  for key in keys:
    dtype = np.float32 if key in ("loss_weights", "images", "image_masks") else np.int32
    row[key] = np.full(shapes.get(key, (spec.seq_len,)), 0 if key == "loss_weights" else -1, dtype)
  return row


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

class _TrainExampleFn:
  """Grain map: global stream position -> padded example, or a drop marker (kept for order)."""

  def __init__(self, sources, source_cfgs, plan: MixturePlan, tok, spec: _ExampleSpec, seed: int):
    self.sources, self.source_cfgs, self.plan = sources, source_cfgs, plan
    self.tok, self.spec, self.seed = tok, spec, seed

  def __call__(self, position: int) -> dict[str, Any]:
    source, record_index, _ = self.plan.locate(position)
    cfg = self.source_cfgs[source]
    where = record_location(self.sources[source], cfg.name, record_index,
                            f"stream position {position}")
    rng = np.random.default_rng([self.seed, _EXAMPLE_SALT, position])
    try:
      ex = record_to_example(self.sources[source][record_index], cfg, self.tok, self.spec,
                             for_training=True, rng=rng)
    except (ValueError, OSError) as e:   # a bad image or record: name its line, not the stream
      raise RecordError(f"{where}: {e}") from e
    except Exception as e:
      e.add_note(f"while pre-processing {where}")
      raise
    row = fit_example(ex, self.spec, where)
    out = {_POSITION: np.int64(position), "dropped": np.bool_(row is None), **(row or {})}
    out[_ALONE] = np.bool_(cfg.pack is False)
    return out


def _kept(element: Mapping[str, Any]) -> bool:
  return not bool(element["dropped"])


def _batch_rows(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return _stack([{k: v for k, v in r.items() if k not in ("dropped", _ALONE)} for r in rows])


def _check_tokenizer(tok: MolmoTokenizer, model_cfg: MolmoConfig) -> None:
  if tok.vocab_size != model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer vocab_size {tok.vocab_size} != model llm.vocab_size "
                     f"{model_cfg.llm.vocab_size}: image token ids would not match the model")


def _example_spec(data_cfg: DataConfig, model_cfg: MolmoConfig) -> _ExampleSpec:
  max_crops = data_cfg.max_crops or model_cfg.preprocess.max_crops
  return _ExampleSpec(model_cfg.preprocess, data_cfg.seq_len, max_crops, data_cfg.on_overflow,
                      data_cfg.pack_conversations, data_cfg.max_conversations,
                      data_cfg.root_subsegment_weighting)


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must lie in [0, process_count = "
                     f"{process_count})")
  if global_batch % process_count:
    raise ValueError(f"global_batch_size {global_batch} is not divisible by process_count "
                     f"{process_count}")
  return global_batch // process_count


def _with_workers(ds: grain.IterDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
  if num_workers == 0:
    return ds
  from absl import flags  # grain's worker start-up reads absl flags; apps without absl.app
  if not flags.FLAGS.is_parsed():   # never parse them, so mark the defaults as parsed
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(prefetch, 1)))


class TrainIterator:
  """Endless iterator of local batches with a JSON-able, exactly resumable state.

  `get_state()` -> {"version", "next_index", "process_index", "process_count", "fingerprint"};
  `set_state(state)` makes the next batch the one that followed when the state was taken.
  """

  def __init__(self, example_fn: _TrainExampleFn, local_batch: int, process_index: int,
               process_count: int, num_workers: int, prefetch: int, fingerprint: str,
               packing: Mapping[str, int] | None = None):
    self._example_fn, self.local_batch = example_fn, local_batch
    self.process_index, self.process_count = process_index, process_count
    self._num_workers, self._prefetch, self._fingerprint = num_workers, prefetch, fingerprint
    self._next_index = 0
    self._iterator = None
    self.last_positions = np.zeros(0, np.int64)   # global stream positions of the last batch
    # Packing (DataConfig.pack_examples): {"seq_len", "crop_slots", "bins"}; rows closed by the
    # packer wait in _pending until a batch takes them.
    self._packing = dict(packing) if packing else None
    self._packer = None
    self._pending: list[tuple[dict[str, np.ndarray], list[int]]] = []
    self._tokens = self._slots = self._examples = self._rows = 0

  @property
  def non_padding_fraction(self) -> float:
    """Tokens that are not padding / token slots, over every batch returned so far."""
    return self._tokens / self._slots if self._slots else 0.0

  @property
  def examples_per_row(self) -> float:
    return self._examples / self._rows if self._rows else 0.0

  def _new_packer(self):
    from molmo_jax.data.packing import RowPacker
    spec = self._example_fn.spec
    crop_shapes = {"images": (spec.pre.crop_patches ** 2, spec.pre.patch_size ** 2 * 3),
                   "image_masks": (spec.pre.crop_patches ** 2,),
                   "image_input_idx": (spec.pre.pooled_per_crop,)}
    return RowPacker(self._packing["seq_len"], self._packing["crop_slots"],
                          self._packing["bins"], crop_shapes)

  def _unpadded(self, position: int, element: Mapping[str, Any] | None = None):
    """The example at a stream position as the packer takes it: (arrays, alone) or None."""
    from molmo_jax.data.packing import strip_padding
    element = self._example_fn(position) if element is None else element
    if bool(element["dropped"]):
      return None
    row = {k: v for k, v in element.items() if k not in ("dropped", _ALONE, _POSITION)}
    return strip_padding(row), bool(element[_ALONE])

  def _next_packed(self) -> dict[str, np.ndarray]:
    if self._packer is None:
      self._packer = self._new_packer()
    while len(self._pending) < self.local_batch:
      element = next(self._iterator)
      position = int(element[_POSITION])
      example, alone = self._unpadded(position, element)
      self._pending += self._packer.add(example, position, alone=alone)
      self._next_index = (position - self.process_index) // self.process_count + 1
    rows, self._pending = self._pending[:self.local_batch], self._pending[self.local_batch:]
    batch = _stack([r for r, _ in rows])
    self.last_positions = np.asarray([p for _, tags in rows for p in tags], np.int64)
    self._examples += len(self.last_positions)
    return batch

  @property
  def plan(self) -> MixturePlan:
    return self._example_fn.plan

  def _build(self):
    start = self.process_index + self.process_count * self._next_index
    ds = grain.MapDataset.range(start, sys.maxsize, self.process_count).map(self._example_fn)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = _with_workers(ds, self._num_workers, self._prefetch)
    ds = ds.filter(_kept)
    if self._packing is None:
      ds = ds.batch(self.local_batch, drop_remainder=True, batch_fn=_batch_rows)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._build()
    if self._packing is not None:
      batch = self._next_packed()
    else:
      batch = next(self._iterator)
      positions = self.last_positions = batch.pop(_POSITION)
      self._next_index = (int(positions[-1]) - self.process_index) // self.process_count + 1
      self._examples += len(positions)
    ids = batch["input_ids"]
    self._tokens += int(np.sum(ids != -1))
    self._slots += ids.size
    self._rows += ids.shape[0]
    if self._rows // ids.shape[0] % 100 == 1:
      _log.info("data: %.1f %% of token slots are not padding, %.2f examples per row",
                100 * self.non_padding_fraction, self.examples_per_row)
    return batch

  def get_state(self) -> dict[str, Any]:
    state = {"version": _STATE_VERSION, "next_index": self._next_index,
             "process_index": self.process_index, "process_count": self.process_count,
             "fingerprint": self._fingerprint}
    if self._packing is not None:
      # Examples read but not yet in a returned batch: closed rows waiting, then open rows.
      state["packed_rows"] = [list(map(int, tags)) for _, tags in self._pending]
      state["open_rows"] = self._packer.open_tags() if self._packer is not None else []
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    expected = self.get_state()
    for key in ("version", "process_index", "process_count", "fingerprint"):
      if state.get(key) != expected[key]:
        raise ValueError(f"data iterator state: {key} is {state.get(key)!r}, this pipeline has "
                         f"{expected[key]!r}; the state belongs to another data config, seed or "
                         "process layout")
    next_index = state.get("next_index")
    if not isinstance(next_index, int) or next_index < 0:
      raise ValueError(f"data iterator state: next_index must be an int >= 0, got {next_index!r}")
    self.close()
    self._next_index = next_index
    if self._packing is not None:
      self._restore_packing(state.get("packed_rows", []), state.get("open_rows", []))

  def _restore_packing(self, packed_rows: Sequence[Sequence[int]],
                       open_rows: Sequence[Sequence[int]]) -> None:
    """Rebuilds the rows that were waiting from their stream positions (examples are a pure
    function of the position)."""
    from molmo_jax.data.packing import pack_row
    self._packer = self._new_packer()
    self._pending = []
    for tags in packed_rows:
      examples = [self._unpadded(int(p))[0] for p in tags]
      row = pack_row(examples, self._packer.seq_len, self._packer.crop_slots, self._packer.crop_shapes)
      self._pending.append((row, [int(p) for p in tags]))
    self._packer.restore([[(self._unpadded(int(p))[0], int(p)) for p in tags] for tags in open_rows])

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


def _fingerprint(data_cfg: DataConfig, sizes: Sequence[int], rates: np.ndarray,
                 process_count: int) -> str:
  stream = {"sources": [[s.name, n] for s, n in zip(data_cfg.sources, sizes)],
            "rates": [round(float(r), 12) for r in rates], "seed": data_cfg.seed,
            "shuffle": data_cfg.shuffle, "process_count": process_count}
  if data_cfg.pack_examples:    # a packed stream resumes only as a packed stream of this layout
    stream["packing"] = [data_cfg.seq_len, data_cfg.pack_bins, data_cfg.pack_crop_slots]
  return hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16]


def make_train_iterator(data_cfg: DataConfig, model_cfg: MolmoConfig, tokenizer: MolmoTokenizer,
                        *, process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """The training batches of one JAX process (B = G / process_count rows each)."""
  _check_tokenizer(tokenizer, model_cfg)
  local_batch = _local_batch(data_cfg.global_batch_size, process_index, process_count)
  sources = [open_source(s) for s in data_cfg.sources]
  sizes = [len(s) for s in sources]
  rates = mixture_rates(data_cfg.sources, sizes, data_cfg.group_rates)
  plan = MixturePlan(sizes, rates, data_cfg.seed, data_cfg.shuffle)
  spec = _example_spec(data_cfg, model_cfg)
  example_fn = _TrainExampleFn(sources, data_cfg.sources, plan, tokenizer, spec, data_cfg.seed)
  _log.info("data mixture: %s",
            {s.name: round(float(r), 4) for s, r in zip(data_cfg.sources, rates)})
  packing = None
  if data_cfg.pack_examples:
    packing = {"seq_len": data_cfg.seq_len, "bins": data_cfg.pack_bins,
               "crop_slots": data_cfg.pack_crop_slots or spec.max_crops + 1}
  return TrainIterator(example_fn, local_batch, process_index, process_count,
                       data_cfg.num_workers, data_cfg.prefetch,
                       _fingerprint(data_cfg, sizes, rates, process_count), packing)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

class _EvalRowFn:
  """Grain map: local row -> padded example with valid/source_index/record_index."""

  def __init__(self, sources, source_cfgs, tok, spec: _ExampleSpec, for_training: bool,
               seed: int, local_batch: int, process_index: int, process_count: int):
    self.sources, self.source_cfgs, self.tok, self.spec = sources, source_cfgs, tok, spec
    self.for_training, self.seed = for_training, seed
    self.local_batch = local_batch
    self.process_index, self.process_count = process_index, process_count
    self.offsets = np.cumsum([0] + [len(s) for s in sources])
    keys = TEXT_KEYS if for_training else ("input_ids", "subsegment_ids", "position_ids")
    self.keys = tuple(keys) + IMAGE_KEYS

  def global_row(self, local_row: int) -> int:
    step, i = divmod(local_row, self.local_batch)
    return (step * self.process_count + self.process_index) * self.local_batch + i

  def __call__(self, local_row: int) -> dict[str, np.ndarray]:
    row = self.global_row(local_row)
    out = None
    source = record_index = -1   # stays -1 on the padding rows of the last batch
    if row < self.offsets[-1]:
      source = int(np.searchsorted(self.offsets, row, side="right") - 1)
      record_index = row - int(self.offsets[source])
      cfg = self.source_cfgs[source]
      where = record_location(self.sources[source], cfg.name, record_index, "eval")
      rng = np.random.default_rng([self.seed, _EXAMPLE_SALT, row]) if self.for_training else None
      try:
        ex = record_to_example(self.sources[source][record_index], cfg, self.tok, self.spec,
                               self.for_training, rng)
      except (ValueError, OSError) as e:
        raise RecordError(f"{where}: {e}") from e
      except Exception as e:
        e.add_note(f"while pre-processing {where}")
        raise
      out = fit_example(ex, self.spec, where)
    valid = out is not None
    out = {k: out[k] for k in self.keys} if valid else empty_row(self.keys, self.spec)
    # A dropped (overflowing) row keeps its indices with valid False.
    return {**out, "valid": np.bool_(valid), "source_index": np.int32(source),
            "record_index": np.int32(record_index)}


def make_eval_batches(data_cfg: DataConfig, model_cfg: MolmoConfig, tokenizer: MolmoTokenizer,
                      *, process_index: int = 0, process_count: int = 1,
                      for_training: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the sources in order (no mixture, shuffle or repeat) in local batches.

  Global batch t holds rows t*G .. t*G + G - 1 of the concatenated sources; process p gets the
  slice [p*B, (p+1)*B). The last batch is filled with padding rows (every value -1, valid False),
  so every process yields ceil(rows / G) batches of B rows. `for_training=True` builds loss
  examples (targets and weights); False builds prompts for generation (the first conversation
  without its last answer). Overflowing rows follow on_overflow; "drop" turns them into padding
  rows (valid False) so shapes and batch counts stay fixed.
  """
  _check_tokenizer(tokenizer, model_cfg)
  local_batch = _local_batch(data_cfg.global_batch_size, process_index, process_count)
  sources = [open_source(s) for s in data_cfg.sources]
  total = sum(len(s) for s in sources)
  num_batches = math.ceil(total / data_cfg.global_batch_size)
  spec = _example_spec(data_cfg, model_cfg)
  row_fn = _EvalRowFn(sources, data_cfg.sources, tokenizer, spec, for_training, data_cfg.seed,
                      local_batch, process_index, process_count)
  ds = grain.MapDataset.range(num_batches * local_batch).map(row_fn)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = _with_workers(ds, data_cfg.num_workers, data_cfg.prefetch)
  return _closing(iter(ds.batch(local_batch, drop_remainder=True, batch_fn=_stack)))


def _closing(iterator) -> Iterator[dict[str, np.ndarray]]:
  # A generator, so the worker processes are released when the caller stops early.
  try:
    yield from iterator
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
