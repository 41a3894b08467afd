"""Sequence packing across examples: several examples, each with its images, in one row.

Legend: S = seq_len, M = crop slots of a packed row, P patches per crop, C patch values,
Q pooled cells per crop, n = examples in one row, T_i / N_i tokens / crops of example i.

A packed row is the concatenation of its examples' unpadded arrays, then padded like a plain row:

  input_ids, target_ids, loss_weights, subsegment_ids, position_ids   [S]   (example after example)
  segment_ids     [S]        0 0 0 0 1 1 1 2 2 2 2 -1 -1   which example a token belongs to
  images          [M, P, C]  the examples' crops one after another, then absent slots (-1)
  image_masks     [M, P]
  image_input_idx [M, Q]     example i's indices shifted by its first token's offset in the row

Positions restart at 0 with every example (each keeps its own position_ids), loss weights are
the example's own (so each example's share of the loss is what it is unpacked), and the model
lets a token attend only to tokens of the same segment (`models/molmo.py: text_attention_mask`),
so every example computes exactly what it computes alone. The packed-conversation rule inside an
example (subsegment_ids) is unchanged.

`RowPacker` keeps a few rows open and puts each arriving example into the open row it fills best
(the one with the least room left that still takes its tokens and crops; best fit); when none
has room the fullest open row is emitted. On examples of 100..2304 tokens in 2304-token rows this
reaches ~93 % real tokens with 16 open rows, where first fit with oldest-out reaches ~87 % with 8
(benchmarks/packing.py, docs/scaling.md).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from molmo_jax.preprocess.examples import IMAGE_KEYS, TEXT_KEYS

SEGMENT_KEY = "segment_ids"


def example_size(ex: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(tokens, crops) of an unpadded example."""
  return len(ex["input_ids"]), (ex["images"].shape[0] if "images" in ex else 0)


def strip_padding(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A padded single-example row (pipeline `fit_example`) -> its unpadded arrays.

  Padding is at the end: tokens with input_ids == -1, crop slots whose pixels are all -1.
  """
  length = int(np.sum(np.asarray(row["input_ids"]) != -1))
  out = {k: np.asarray(row[k])[:length] for k in TEXT_KEYS if k in row}
  if "images" in row:
    present = np.any(np.asarray(row["images"]) != -1, axis=tuple(range(1, row["images"].ndim)))
    crops = int(present.sum())
    if not present[:crops].all():
      raise ValueError("strip_padding: absent crop slots before present ones; expected the "
                       "layout of preprocess.examples.collate")
    out.update({k: np.asarray(row[k])[:crops] for k in IMAGE_KEYS})
  return out


def pack_row(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int, crop_slots: int,
             crop_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
  """Unpadded examples -> one packed row of fixed shapes (see the module legend).

  crop_shapes: per image key, the shape of one crop slot (needed when no example has images;
  otherwise taken from the examples).
  """
  if not examples:
    raise ValueError("pack_row: no examples")
  tokens = sum(example_size(ex)[0] for ex in examples)
  crops = sum(example_size(ex)[1] for ex in examples)
  if tokens > seq_len or crops > crop_slots:
    raise ValueError(f"pack_row: {tokens} tokens / {crops} crops do not fit seq_len {seq_len} / "
                     f"{crop_slots} crop slots")
  text_keys = [k for k in TEXT_KEYS if k in examples[0]]
  row: dict[str, np.ndarray] = {}
  for key in text_keys:
    dtype = np.float32 if key == "loss_weights" else np.int32
    fill = 0 if key == "loss_weights" else -1
    row[key] = np.full((seq_len,), fill, dtype)
  row[SEGMENT_KEY] = np.full((seq_len,), -1, np.int32)
  with_images = any("images" in ex for ex in examples) or crop_shapes is not None
  if with_images:
    shapes = dict(crop_shapes or {})
    for ex in examples:
      for key in IMAGE_KEYS:
        if key in ex and key not in shapes:
          shapes[key] = tuple(np.asarray(ex[key]).shape[1:])
    for key in IMAGE_KEYS:
      dtype = np.int32 if key == "image_input_idx" else np.float32
      row[key] = np.full((crop_slots,) + shapes[key], -1, dtype)
  offset = crop = 0
  for index, ex in enumerate(examples):
    n_tokens, n_crops = example_size(ex)
    for key in text_keys:
      row[key][offset:offset + n_tokens] = ex[key]
    row[SEGMENT_KEY][offset:offset + n_tokens] = index
    if with_images and n_crops:
      row["images"][crop:crop + n_crops] = ex["images"]
      row["image_masks"][crop:crop + n_crops] = ex["image_masks"]
      idx = np.asarray(ex["image_input_idx"])
      row["image_input_idx"][crop:crop + n_crops] = np.where(idx >= 0, idx + offset, -1)
    offset += n_tokens
    crop += n_crops
  return row


class RowPacker:
  """Packs a stream of unpadded examples into rows of `seq_len` tokens and `crop_slots` crops.

  `add(example, tag)` returns the rows it closes (a list, usually empty); `open_tags()` lists the
  tags of the examples waiting in open rows (the pipeline stores their stream positions to resume
  exactly); `flush()` closes every open row. Each returned row is (packed arrays, tags).
  """

  def __init__(self, seq_len: int, crop_slots: int, num_bins: int = 16,
               crop_shapes: Mapping[str, tuple[int, ...]] | None = None):
    if seq_len < 1 or crop_slots < 0 or num_bins < 1:
      raise ValueError(f"RowPacker: expected seq_len >= 1, crop_slots >= 0, num_bins >= 1; "
                       f"got {seq_len}, {crop_slots}, {num_bins}")
    self.seq_len, self.crop_slots, self.num_bins = seq_len, crop_slots, num_bins
    self.crop_shapes = crop_shapes
    self._bins: list[dict[str, Any]] = []       # {"examples", "tags", "tokens", "crops"}

  def _close(self, b: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[Any]]:
    return pack_row(b["examples"], self.seq_len, self.crop_slots, self.crop_shapes), b["tags"]

  def add(self, example: Mapping[str, np.ndarray], tag: Any = None, alone: bool = False
          ) -> list[tuple[dict[str, np.ndarray], list[Any]]]:
    """Places one example; `alone=True` gives it a row of its own (a source that does not pack)."""
    tokens, crops = example_size(example)
    if tokens > self.seq_len or crops > self.crop_slots:
      raise ValueError(f"example {tag!r}: {tokens} tokens / {crops} crops do not fit seq_len "
                       f"{self.seq_len} / {self.crop_slots} crop slots")
    new = {"examples": [example], "tags": [tag], "tokens": tokens, "crops": crops}
    if alone:
      return [self._close(new)]
    fits = [i for i, b in enumerate(self._bins)
            if b["tokens"] + tokens <= self.seq_len and b["crops"] + crops <= self.crop_slots]
    if fits:
      i = min(fits, key=lambda j: self.seq_len - self._bins[j]["tokens"])     # best fit
      b = self._bins[i]
      b["examples"].append(example)
      b["tags"].append(tag)
      b["tokens"] += tokens
      b["crops"] += crops
      if b["tokens"] == self.seq_len:             # nothing more can go in
        del self._bins[i]
        return [self._close(b)]
      return []
    out = []
    if len(self._bins) >= self.num_bins:           # emit the fullest open row
      fullest = max(range(len(self._bins)), key=lambda j: self._bins[j]["tokens"])
      out.append(self._close(self._bins.pop(fullest)))
    self._bins.append(new)
    return out

  def restore(self, rows: Sequence[Sequence[tuple[Mapping[str, np.ndarray], Any]]]) -> None:
    """Sets the open rows to `rows` (each a list of (example, tag)), e.g. after a resume."""
    self._bins = []
    for row in rows:
      examples = [ex for ex, _ in row]
      self._bins.append({"examples": examples, "tags": [tag for _, tag in row],
                         "tokens": sum(example_size(ex)[0] for ex in examples),
                         "crops": sum(example_size(ex)[1] for ex in examples)})

  def open_tags(self) -> list[list[Any]]:
    return [list(b["tags"]) for b in self._bins]

  def flush(self) -> list[tuple[dict[str, np.ndarray], list[Any]]]:
    out = [self._close(b) for b in self._bins]
    self._bins = []
    return out


def pack_all(examples: Iterable[Mapping[str, np.ndarray]], seq_len: int, crop_slots: int,
             num_bins: int = 16) -> list[dict[str, np.ndarray]]:
  """Every example packed (best fit), open rows flushed at the end: the packed rows, in order."""
  packer = RowPacker(seq_len, crop_slots, num_bins)
  rows = []
  for i, ex in enumerate(examples):
    rows += [r for r, _ in packer.add(ex, i)]
  rows += [r for r, _ in packer.flush()]
  return rows


def non_padding_fraction(rows: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray]) -> float:
  """Tokens that are not padding / all token slots, over rows (or a batch [B, S])."""
  ids = (np.asarray(rows["input_ids"]) if isinstance(rows, Mapping)
         else np.stack([np.asarray(r["input_ids"]) for r in rows]))
  return float(np.mean(ids != -1)) if ids.size else 0.0
