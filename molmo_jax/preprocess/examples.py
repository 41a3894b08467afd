"""Training and inference examples: chat text + image blocks -> model arrays; packing; collation.

Legend: T = tokens of one example, N = crops of all its images (global views included), P = patches
per crop, C = patch_size*patch_size*3, Q = pooled cells per crop, B = batch, S = seq_len,
M = max_crops + 1 crop slots.

One example (`MultiModalPreprocessor.__call__` in the reference), `tokens` = image blocks + chat
text with EOS after every answer:
  training   input_ids = [BOS] + tokens[:-1], target_ids = tokens (the shift is baked in here),
             loss_weights[i] = weight of predicting target_ids[i]: answer tokens and their EOS
  inference  input_ids = [BOS] + tokens
Text-only examples (no image) have no BOS, as in the reference (PreprocessConfig.text_only_bos
adds it): inference input_ids = tokens; training input_ids = tokens[:-1], target_ids = tokens[1:]
(the reference's own text-only training arrays repeat the input as the target; see
docs/fidelity.md).
Each image's block replaces its `<|image|>` marker when the text has markers, else all blocks go
right after BOS. `image_input_idx` indexes input_ids (the +1 for BOS is included); discarded cells
stay -100 (the reference adds the insertion offset to them too, the reference's olmo/data/model_preprocessor.py (a bug there); we do not).

Packing several conversations about one image (the reference's olmo/data/model_preprocessor.py (several conversations per image)), e.g. image block I, conversations a, b:
  input_ids      BOS I I I a a a a b b b      (the last EOS is only a target)
  subsegment_ids  S S S S 1 1 1 1 2 2 2       S = ATTEND_ALL_SUBSEGMENT (BOS takes the first token's)
  position_ids    0 1 2 3 4 5 6 7 4 5 6       cumsum(seg >= s) - 1 for the tokens of segment s
A query attends to a key iff causal and seg_q <= seg_k (both valid): each conversation sees the image
and itself. Every loss weight is scaled by sqrt(1/n) for n conversations (`root_subsegments`).
An unpacked example has subsegment_ids all 0 and position_ids 0..T-1.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from molmo_jax.config import MolmoConfig, PreprocessConfig
from molmo_jax.preprocess.tokens import (MolmoTokenizer, format_messages, image_input_idx,
                                         image_token_block, with_style)
from molmo_jax.preprocess.types import MultiCropImage

ATTEND_ALL_SUBSEGMENT = 10000
TEXT_KEYS = ("input_ids", "target_ids", "loss_weights", "subsegment_ids", "position_ids")
IMAGE_KEYS = ("images", "image_masks", "image_input_idx")
# Metadata kept in an example for `collate`, not batched: input positions [0, end) hold BOS and
# every image block, so text may only be truncated at or after `end`.
IMAGE_TOKENS_END = "image_tokens_end"
OVERFLOW_POLICIES = ("error", "drop", "truncate_text")

_log = logging.getLogger(__name__)


def build_example(messages: Sequence[str] | Sequence[Sequence[str]],
                  images: Sequence[MultiCropImage] | None,
                  tok: MolmoTokenizer,
                  cfg: PreprocessConfig | MolmoConfig,
                  for_training: bool,
                  rng: Any = None,
                  style: str | None = None,
                  weight: float | None = None,
                  message_format: str = "role",
                  root_subsegment_weighting: bool = True) -> dict[str, np.ndarray]:
  """Arrays for one example (see the module docstring for the layout).

  Args:
    messages: alternating raw user/assistant turns (a conversation), or a list of conversations
      about the same images to pack (training only). Turns are wrapped by `format_messages`.
    images: images in order of their `<|image|>` markers (or all at the start); None or [] for text.
    tok: the tokenizer.
    cfg: pre-processing config (use_col_tokens, always_start_with_space, crop geometry).
    for_training: conversations must end with an answer (training) or a user turn (inference).
    rng: numpy Generator/RandomState; shuffles packed conversations and samples demo-style prefixes.
    style: optional style whose "{style}: " prefix goes before each conversation's first question.
    weight: optional per-example loss weight.
    message_format: "role" (User:/Assistant:) or "none" (captioning stage).
    root_subsegment_weighting: scale loss weights by sqrt(1/n) for n packed conversations.

  Returns:
    input_ids [T] int32, subsegment_ids [T] int32, position_ids [T] int32, images [N, P, C] float32,
    image_masks [N, P] float32, image_input_idx [N, Q] int32, image_tokens_end (scalar int32) and,
    for training, target_ids [T] int32 and loss_weights [T] float32.
  """
  pre = cfg.preprocess if isinstance(cfg, MolmoConfig) else cfg
  conversations = _as_conversations(messages)
  packed = len(conversations) > 1
  if packed and not for_training:
    raise ValueError(f"packing {len(conversations)} conversations is for training only")
  for index, turns in enumerate(conversations):
    _check_turns(turns, index, for_training)
  if packed and rng is not None:
    conversations = [conversations[i] for i in rng.permutation(len(conversations))]
  images = [images] if isinstance(images, MultiCropImage) else list(images or [])
  for index, image in enumerate(images):
    _check_image(image, index, pre)

  texts = [_tokenize_conversation(_styled(turns, style, rng), tok, message_format,
                                  pre.always_start_with_space) for turns in conversations]
  text_ids = np.concatenate([ids for ids, _ in texts])
  text_weights = np.concatenate([w for _, w in texts])
  text_segments = np.concatenate([np.full(len(ids), k + 1 if packed else 0, np.int32)
                                  for k, (ids, _) in enumerate(texts)])
  places = _image_places(text_ids, len(images), tok, packed)
  blocks = [image_token_block(image, tok, pre.use_col_tokens) for image in images]
  tokens, weights, segments, block_starts = _interleave(
      text_ids, text_weights, text_segments, [b for b, _ in blocks], places,
      ATTEND_ALL_SUBSEGMENT if packed else 0)

  scale = 1.0 if weight is None else float(weight)
  if root_subsegment_weighting:
    scale *= math.sqrt(1.0 / len(conversations))
  # Text-only examples have no BOS by default (the reference); `text_only_bos` restores it.
  with_bos = bool(images) or pre.text_only_bos
  bos = np.array([tok.bos_id] if with_bos else [], np.int32)
  first_segment = segments[:1] if with_bos else np.zeros(0, np.int32)
  if for_training and not with_bos:   # predict tokens[1:] from tokens[:-1]
    target_ids, weights = tokens[1:], weights[1:]
  else:
    target_ids = tokens
  if for_training:
    input_ids = np.concatenate([bos, tokens[:-1]])
    subsegment_ids = np.concatenate([first_segment, segments[:-1]])
  else:
    input_ids = np.concatenate([bos, tokens])
    subsegment_ids = np.concatenate([first_segment, segments])

  out = {
      "input_ids": input_ids.astype(np.int32),
      "subsegment_ids": subsegment_ids.astype(np.int32),
      "position_ids": position_ids_from_segments(subsegment_ids),
      **_image_arrays(images, blocks, block_starts, pre),
  }
  # +1: positions in input_ids are one past positions in tokens because of BOS.
  ends = [start + len(block) + 1 for start, (block, _) in zip(block_starts, blocks)]
  out[IMAGE_TOKENS_END] = np.int32(max(ends, default=0))
  if for_training:
    out["target_ids"] = target_ids.astype(np.int32)
    out["loss_weights"] = (weights * scale).astype(np.float32)
  return out


def _as_conversations(messages: Any) -> list[list[str]]:
  if isinstance(messages, str) or not isinstance(messages, (list, tuple)):
    raise TypeError(f"messages must be a list of turns or a list of conversations, got "
                    f"{type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty")
  if all(isinstance(m, str) for m in messages):
    return [list(messages)]
  if all(isinstance(m, (list, tuple)) for m in messages):
    for index, turns in enumerate(messages):
      if not turns or not all(isinstance(t, str) for t in turns):
        raise TypeError(f"conversation {index} must be a non-empty list of str turns")
    return [list(turns) for turns in messages]
  raise TypeError("messages mixes str turns and conversations; give one or the other")


def _check_turns(turns: list[str], index: int, for_training: bool) -> None:
  ends_with_answer = len(turns) % 2 == 0
  if for_training and not ends_with_answer:
    raise ValueError(f"conversation {index} has {len(turns)} turns, ending with a user turn; "
                     "training needs it to end with an assistant answer")
  if not for_training and ends_with_answer:
    raise ValueError(f"conversation {index} has {len(turns)} turns, ending with an answer; "
                     "inference needs it to end with a user turn")


def _check_image(image: MultiCropImage, index: int, pre: PreprocessConfig) -> None:
  patches = pre.crop_patches ** 2
  patch_dim = pre.patch_size ** 2 * 3
  crops = image.images.shape[0] if image.images.ndim == 3 else None
  expected = {
      "images": (crops, patches, patch_dim),
      "image_masks": (crops, patches),
      "feature_rank": (crops, pre.pooled_per_crop),
  }
  for name, shape in expected.items():
    got = tuple(np.shape(getattr(image, name)))
    if got != shape:
      raise ValueError(
          f"images[{index}].{name} has shape {got}, expected {shape} for crop_size="
          f"{pre.crop_size}, patch_size={pre.patch_size}, pool_size={pre.pool_size}")


def _styled(turns: list[str], style: str | None, rng: Any) -> list[str]:
  return [with_style(turns[0], style, rng)] + turns[1:] if style else turns


def _tokenize_conversation(turns: list[str], tok: MolmoTokenizer, message_format: str,
                           always_start_with_space: bool) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of one conversation and their loss weights (1 on answers and their EOS)."""
  ids: list[int] = []
  weights: list[float] = []
  for index, text in enumerate(format_messages(turns, message_format, always_start_with_space)):
    piece = tok.encode(text)
    is_answer = index % 2 == 1
    if is_answer:
      piece.append(tok.eos_id)
    ids.extend(piece)
    weights.extend([float(is_answer)] * len(piece))
  return np.array(ids, np.int32), np.array(weights, np.float32)


def _image_places(text_ids: np.ndarray, num_images: int, tok: MolmoTokenizer,
                  packed: bool) -> list[tuple[int, int]]:
  """(index in text_ids, tokens replaced) where each image block goes."""
  markers = np.flatnonzero(text_ids == tok.image_prompt_id)
  if len(markers) == 0:
    return [(0, 0)] * num_images
  if packed:
    raise ValueError("packed conversations need their images at the start; found "
                     f"{len(markers)} <|image|> marker(s) in the text")
  if len(markers) != num_images:
    raise ValueError(f"the text has {len(markers)} <|image|> marker(s) but {num_images} image(s) "
                     "were given; give one image per marker, or no markers")
  return [(int(m), 1) for m in markers]


def _interleave(text_ids: np.ndarray, text_weights: np.ndarray, text_segments: np.ndarray,
                blocks: list[np.ndarray], places: list[tuple[int, int]], image_segment: int):
  """Puts the image blocks into the text; returns tokens, weights, segments, block starts."""
  ids, weights, segments, starts = [], [], [], []
  cursor = 0
  length = 0
  for block, (at, replaced) in zip(blocks, places):
    ids.append(text_ids[cursor:at])
    weights.append(text_weights[cursor:at])
    segments.append(text_segments[cursor:at])
    length += at - cursor
    starts.append(length)
    ids.append(block)
    weights.append(np.zeros(len(block), np.float32))
    segments.append(np.full(len(block), image_segment, np.int32))
    length += len(block)
    cursor = at + replaced
  ids.append(text_ids[cursor:])
  weights.append(text_weights[cursor:])
  segments.append(text_segments[cursor:])
  return (np.concatenate(ids).astype(np.int32), np.concatenate(weights).astype(np.float32),
          np.concatenate(segments).astype(np.int32), starts)


def _image_arrays(images: list[MultiCropImage], blocks: list[tuple[np.ndarray, np.ndarray]],
                  block_starts: list[int], pre: PreprocessConfig) -> dict[str, np.ndarray]:
  patches, patch_dim = pre.crop_patches ** 2, pre.patch_size ** 2 * 3
  if not images:
    return {"images": np.zeros((0, patches, patch_dim), np.float32),
            "image_masks": np.zeros((0, patches), np.float32),
            "image_input_idx": np.zeros((0, pre.pooled_per_crop), np.int32)}
  return {
      "images": np.concatenate([np.asarray(im.images, np.float32) for im in images]),
      "image_masks": np.concatenate([np.asarray(im.image_masks, np.float32) for im in images]),
      "image_input_idx": np.concatenate([
          image_input_idx(im, positions, start + 1)
          for im, (_, positions), start in zip(images, blocks, block_starts)]),
  }


def position_ids_from_segments(subsegment_ids: np.ndarray) -> np.ndarray:
  """[T] position of each token: cumsum(seg >= s) - 1 over the tokens of segment s (the reference's olmo/data/model_preprocessor.py (several conversations per image))."""
  seg = np.asarray(subsegment_ids)
  if seg.ndim != 1:
    raise ValueError(f"subsegment_ids must be [T], got shape {seg.shape}")
  positions = np.zeros(seg.shape, np.int32)
  for s in np.unique(seg):
    here = seg == s
    positions[here] = (np.cumsum(seg >= s) - 1)[here]
  return positions


def attention_mask_from_segments(subsegment_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """[..., T, T] bool reference mask: key k visible to query q iff k <= q, seg_q <= seg_k and both
  tokens are valid. The model computes the same rule in JAX; this is the cross-check."""
  seg = np.asarray(subsegment_ids)
  valid = np.asarray(valid, bool)
  if seg.shape != valid.shape:
    raise ValueError(f"subsegment_ids {seg.shape} and valid {valid.shape} must have one shape")
  length = seg.shape[-1]
  causal = np.tril(np.ones((length, length), bool))
  segments = seg[..., :, None] <= seg[..., None, :]
  both_valid = valid[..., :, None] & valid[..., None, :]
  return causal & segments & both_valid


# --------------------------------------------------------------------------------------------
# Collation (the reference's olmo/data/collator.py)
# --------------------------------------------------------------------------------------------

_PAD = {"loss_weights": 0.0}  # 0, not the reference's -1: weight sums stay right without a > 0 test
_DTYPES = {"loss_weights": np.float32, "images": np.float32, "image_masks": np.float32}


def collate(examples: Sequence[dict[str, np.ndarray]], seq_len: int, max_crops: int,
            on_overflow: str = "error") -> dict[str, np.ndarray]:
  """Pads examples to fixed shapes: text keys [B, S], images [B, M, P, C], image_masks [B, M, P],
  image_input_idx [B, M, Q], padding -1 (loss_weights 0). A crop slot of all -1 is absent.

  on_overflow decides what happens to an example longer than seq_len (or with more crops than M):
  "error" raises, "drop" leaves it out of the batch (B shrinks; filter earlier to keep B fixed),
  "truncate_text" cuts text after the last image block and raises if that is not enough.
  """
  if on_overflow not in OVERFLOW_POLICIES:
    raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
  if not examples:
    raise ValueError("collate: no examples")
  text_keys = [k for k in TEXT_KEYS if k in examples[0]]
  for index, ex in enumerate(examples):
    missing = [k for k in (*text_keys, *IMAGE_KEYS) if k not in ex]
    extra = [k for k in TEXT_KEYS if k in ex and k not in text_keys]
    if missing or extra:
      raise ValueError(f"example {index}: keys differ from example 0 (missing {missing}, "
                       f"extra {extra}); do not mix training and inference examples")
  slots = max_crops + 1
  fitted = [_fit(ex, index, seq_len, slots, on_overflow) for index, ex in enumerate(examples)]
  fitted = [ex for ex in fitted if ex is not None]
  if not fitted:
    raise ValueError(f"collate: all {len(examples)} examples overflowed seq_len {seq_len} / "
                     f"max_crops {max_crops} and were dropped")
  batch = {k: _pad_stack([ex[k] for ex in fitted], (seq_len,), k) for k in text_keys}
  for key in IMAGE_KEYS:
    batch[key] = _pad_stack([ex[key] for ex in fitted], (slots,) + examples[0][key].shape[1:], key)
  return batch


def _fit(ex: dict[str, np.ndarray], index: int, seq_len: int, slots: int,
         on_overflow: str) -> dict[str, np.ndarray] | None:
  crops = ex["images"].shape[0]
  if crops > slots:
    message = (f"example {index}: {crops} crops (all its images, global views included) do not "
               f"fit max_crops + 1 = {slots} slots")
    if on_overflow == "drop":
      _log.warning("dropping %s", message)
      return None
    raise ValueError(message + "; images are never truncated")
  length = len(ex["input_ids"])
  if length <= seq_len:
    return ex
  message = f"example {index}: {length} tokens do not fit seq_len {seq_len}"
  if on_overflow == "error":
    raise ValueError(message + "; use on_overflow='drop' or 'truncate_text', or a longer seq_len")
  if on_overflow == "drop":
    _log.warning("dropping %s", message)
    return None
  image_end = _image_tokens_end(ex, index)
  if image_end > seq_len:
    raise ValueError(message + f": its image blocks end at token {image_end}, so truncating "
                     "the text cannot make it fit without cutting inside an image block")
  return {k: (v[:seq_len] if k in TEXT_KEYS else v) for k, v in ex.items()}


def _image_tokens_end(ex: dict[str, np.ndarray], index: int) -> int:
  if IMAGE_TOKENS_END in ex:
    return int(ex[IMAGE_TOKENS_END])
  if ex["images"].shape[0] == 0:
    return 0
  raise ValueError(f"example {index}: truncate_text needs '{IMAGE_TOKENS_END}' (set by "
                   "build_example) to know where its image blocks end")


def _pad_stack(arrays: list[np.ndarray], shape: tuple[int, ...], key: str) -> np.ndarray:
  dtype = _DTYPES.get(key, np.int32)
  out = np.full((len(arrays),) + shape, _PAD.get(key, -1), dtype)
  for row, array in enumerate(arrays):
    if array.shape[1:] != shape[1:]:
      raise ValueError(f"{key} of batch row {row} has trailing shape {array.shape[1:]}, "
                       f"expected {shape[1:]} as in the first example")
    out[row, :len(array)] = array
  return out
