"""Tokenizer, image special tokens, image token blocks and prompt strings (the reference's olmo/tokenizer.py (special tokens); olmo/data/data_formatter.py (chat format)).

Legend: L = tokens of one image block, F = <im_patch> tokens of one image (= kept pooled cells),
N = crops of one image incl. the global view, Q = pooled cells per crop.

Id rule (the reference's olmo/tokenizer.py (special tokens)): the text tokenizer is padded with placeholders `|<EXTRA_TOKENS_i>|` up to the
model's `vocab_size`, then the five image tokens take ids vocab_size+0..4 in the fixed order
<im_start>, <im_end>, <im_patch>, <im_col>, <|image|>. We never materialise the placeholders: the
five strings are split out of the text before the `tokenizers` model sees it, so an un-padded
tokenizer file and a released one (which ships the placeholders and the five tokens) give the same
ids. Neither Qwen2 nor the OLMo tokenizers define a BOS, so BOS is the EOS token.

Prompt strings (the reference's olmo/data/data_formatter.py): user turns are wrapped as "User: {q} Assistant:", assistant turns are the
bare answer (+ EOS at tokenisation), and every message but the first gets a leading space, the
first one too with `always_start_with_space`:
  " User: {q} Assistant:" " {answer}" <EOS> " User: {q2} Assistant:" ...
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tokenizers

from molmo_jax.preprocess.types import IGNORED_INDEX, MultiCropImage
from molmo_jax.registry import Registry

IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
IMAGE_PATCH = "<im_patch>"
IMAGE_COL = "<im_col>"
IMAGE_PROMPT = "<|image|>"
# The order fixes the ids: vocab_size + position in this tuple.
IMAGE_SPECIAL_TOKENS = (IMAGE_START, IMAGE_END, IMAGE_PATCH, IMAGE_COL, IMAGE_PROMPT)
DEFAULT_EOS_TOKEN = "<|endoftext|>"
PLACEHOLDER_PATTERN = re.compile(r"\|<EXTRA_TOKENS_\d+>\|")

# Tokenizers built in code rather than read from a tokenizer.json directory: name -> factory
# (vocab_size -> tokenizers.Tokenizer, eos token string). The demo registers "builtin:demo".
BUILTIN_TOKENIZERS = Registry(
    "built-in tokenizer", hint="tokenizers from other modules register when they are imported "
    "(the demo's 'builtin:demo': add 'molmo_jax.data.demo_tokenizer' to config.plugins)")
BUILTIN_PREFIX = "builtin:"

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in IMAGE_SPECIAL_TOKENS) + ")")


class MolmoTokenizer:
  """A `tokenizers.Tokenizer` with Molmo's image tokens and EOS-as-BOS.

  Args:
    tokenizer: the text tokenizer (e.g. loaded from a checkpoint's tokenizer.json).
    vocab_size: `LLMConfig.vocab_size`; the image tokens get ids vocab_size+0..4.
    eos_token: the string of the end-of-text token (also used as BOS).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int,
               eos_token: str = DEFAULT_EOS_TOKEN):
    if vocab_size <= 0:
      raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    self.tokenizer = tokenizer
    self.vocab_size = int(vocab_size)
    self._check_ids_beyond_vocab()
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
      raise ValueError(f"eos token {eos_token!r} is not in the tokenizer; pass the right eos_token")
    if eos >= self.vocab_size:
      raise ValueError(f"eos token {eos_token!r} has id {eos}, not below vocab_size {self.vocab_size}")
    self.eos_token = eos_token
    self.eos_id = int(eos)
    self.bos_id = self.eos_id
    (self.image_start_id, self.image_end_id, self.image_patch_id, self.image_col_id,
     self.image_prompt_id) = range(self.vocab_size, self.vocab_size + len(IMAGE_SPECIAL_TOKENS))
    self._special_ids = {s: self.vocab_size + k for k, s in enumerate(IMAGE_SPECIAL_TOKENS)}
    self._placeholder_ids = np.array(
        sorted(i for i, t in tokenizer.get_added_tokens_decoder().items()
               if PLACEHOLDER_PATTERN.fullmatch(t.content)), dtype=np.int64)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, vocab_size: int,
                      eos_token: str | None = None) -> "MolmoTokenizer":
    """Loads `tokenizer.json` from a checkpoint directory (no hub access).

    Without `eos_token`, the eos string comes from `tokenizer_config.json` or
    `special_tokens_map.json` when present (OLMo tokenizers do not use "<|endoftext|>"), else
    "<|endoftext|>".
    """
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {str(directory)!r}")
    if eos_token is None:
      eos_token = _eos_from_configs(directory) or DEFAULT_EOS_TOKEN
    return cls(tokenizers.Tokenizer.from_file(path), vocab_size, eos_token)

  @classmethod
  def from_name_or_directory(cls, name: str | os.PathLike, vocab_size: int) -> "MolmoTokenizer":
    """"builtin:<name>" (a registered built-in tokenizer) or a directory with tokenizer.json."""
    if isinstance(name, str) and name.startswith(BUILTIN_PREFIX):
      build = BUILTIN_TOKENIZERS.get(name)
      tokenizer, eos_token = build(vocab_size)
      return cls(tokenizer, vocab_size, eos_token)
    return cls.from_checkpoint(name, vocab_size)

  def _check_ids_beyond_vocab(self) -> None:
    """Every id >= vocab_size in the file must be the image token that the id rule puts there."""
    size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    for token_id in range(self.vocab_size, size):
      token = self.tokenizer.id_to_token(token_id)
      k = token_id - self.vocab_size
      expected = IMAGE_SPECIAL_TOKENS[k] if k < len(IMAGE_SPECIAL_TOKENS) else None
      if token != expected:
        raise ValueError(
            f"tokenizer has {size} entries but vocab_size is {self.vocab_size}: id {token_id} is "
            f"{token!r}, expected {expected!r} (image tokens must be vocab_size+0..4 in the order "
            f"{list(IMAGE_SPECIAL_TOKENS)})")
    for k, token in enumerate(IMAGE_SPECIAL_TOKENS):
      present = self.tokenizer.token_to_id(token)
      if present is not None and present != self.vocab_size + k:
        raise ValueError(f"tokenizer has {token!r} at id {present}, but Molmo needs it at "
                         f"vocab_size + {k} = {self.vocab_size + k}")

  @property
  def image_special_ids(self) -> tuple[int, ...]:
    return tuple(self._special_ids[s] for s in IMAGE_SPECIAL_TOKENS)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS; the five image strings map to their fixed ids."""
    ids: list[int] = []
    for piece in _SPECIAL_SPLIT.split(text):
      if piece in self._special_ids:
        ids.append(self._special_ids[piece])
      elif piece:
        ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    """Text of `ids`. Does not stop at EOS; drops padding (< 0), image tokens, placeholders."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._placeholder_ids)
    return self.tokenizer.decode(ids[keep].tolist(), skip_special_tokens=skip_special_tokens)


def _eos_from_configs(directory: str | os.PathLike) -> str | None:
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
      eos = eos.get("content")
    if isinstance(eos, str) and eos:
      return eos
  return None


# --------------------------------------------------------------------------------------------
# Image token blocks (the reference's olmo/data/model_preprocessor.py (image token blocks); olmo/data/model_preprocessor.py (image_input_idx))
# --------------------------------------------------------------------------------------------

def _grid_tokens(grid: tuple[int, int], tok: MolmoTokenizer, use_col_tokens: bool) -> np.ndarray:
  rows, cols = grid
  row = [tok.image_patch_id] * cols + ([tok.image_col_id] if use_col_tokens else [])
  return np.array([tok.image_start_id] + row * rows + [tok.image_end_id], dtype=np.int32)


def image_token_block(image: MultiCropImage, tok: MolmoTokenizer,
                      use_col_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The tokens that stand for one image, and where its <im_patch> tokens are.

  Low-res block then high-res block, each `<im_start> ([<im_patch>]*cols <im_col>)*rows <im_end>`;
  <im_col> ends every row, the last one too.

  Returns:
    tokens: [L] int32.
    patch_positions: [F] int32, index in `tokens` of each <im_patch>: the global view's cells in
      raster order, then the high-res pooled grid in raster order (the order of `feature_rank`).
  """
  tokens = np.concatenate([_grid_tokens(image.lowres_grid, tok, use_col_tokens),
                           _grid_tokens(image.pooled_grid, tok, use_col_tokens)])
  patch_positions = np.flatnonzero(tokens == tok.image_patch_id).astype(np.int32)
  return tokens, patch_positions


def image_input_idx(image: MultiCropImage, patch_positions: np.ndarray, offset: int) -> np.ndarray:
  """[N, Q] int32: sequence position of the <im_patch> token each pooled cell is added to.

  `offset` is where the image block starts in the sequence. Discarded cells stay IGNORED_INDEX:
  the reference also adds the offset to them (the reference's olmo/data/model_preprocessor.py (a bug there)), which can make them valid; we do not.
  """
  rank = np.asarray(image.feature_rank)
  num_features = len(patch_positions)
  kept = rank >= 0
  ranks = np.sort(rank[kept])
  if not np.array_equal(ranks, np.arange(num_features)):
    raise ValueError(
        f"image.feature_rank must number the {num_features} <im_patch> tokens of its block "
        f"(lowres {image.lowres_grid} + pooled {image.pooled_grid}) exactly once each; got "
        f"{ranks.size} kept cells with ranks in [{ranks.min() if ranks.size else None}, "
        f"{ranks.max() if ranks.size else None}]")
  positions = np.asarray(patch_positions, dtype=np.int32)
  out = np.full(rank.shape, IGNORED_INDEX, dtype=np.int32)
  out[kept] = positions[rank[kept]] + offset
  return out


# --------------------------------------------------------------------------------------------
# Prompt strings (the reference's olmo/data/data_formatter.py (chat format))
# --------------------------------------------------------------------------------------------

# Styles whose prefix is used only ~10 % of the time in training and never at inference.
DEMO_STYLES = frozenset({"point_count", "pointing", "user_qa", "long_caption"})
# Styles that never get a prefix (android's is part of its prompt already).
NO_PREFIX_STYLES = frozenset({"android_control", "demo"})
EVAL_STYLE_ALIASES = {"eval_short_answer": "vqa2", "eval_multiple_choice": "a_okvqa_mc"}
DEFAULT_INFERENCE_CAPTION_LENGTH = 65
MULTIPLE_CHOICE_LABELS = "ABCDEFG"


def style_prefix(style: str | None, rng: Any = None) -> str:
  """The "{style}:" system prefix of `demo_or_style` prompting, or "" (the reference's olmo/data/data_formatter.py (style prefixes)).

  `rng` (numpy Generator or RandomState) is given in training: demo styles then keep their
  prefix 10 % of the time, as the release was trained. Without it (inference) they get none.
  """
  if not style:
    return ""
  style = EVAL_STYLE_ALIASES.get(style, style)
  if style in NO_PREFIX_STYLES:
    return ""
  if style in DEMO_STYLES and (rng is None or rng.random() > 0.1):
    return ""
  return style + ":"


def join_prefix(prefix: str, prompt: str) -> str:
  """`prefix + " " + prompt`, dropping the space when either side is empty."""
  if prefix and prompt:
    return prefix + " " + prompt
  return prefix or prompt


def with_style(prompt: str, style: str | None, rng: Any = None) -> str:
  """`prompt` with its style prefix: with_style("What?", "vqa2") == "vqa2: What?"."""
  return join_prefix(style_prefix(style, rng), prompt)


def caption_length_prompt(style: str = "long_caption", target: str | None = None, rng: Any = None,
                          inference_length: int | None = DEFAULT_INFERENCE_CAPTION_LENGTH) -> str:
  """Prompt body of `style_and_length` captioning (pre-training stage, the reference's olmo/data/data_formatter.py (style prefixes)).

  Training (`target` and `rng` given): "{style} {n}:" with n = (len(target) + int(N(0, 25))) // 15
  for 90 % of examples, else "{style} :". Inference: n = `inference_length`. The leading space of
  " long_caption 65:" comes from `format_messages`, as for every first message.
  """
  if target is None:
    if rng is not None:
      raise ValueError("caption_length_prompt: an rng without a target; pass the caption to train")
    return f"{style} {inference_length}:" if inference_length is not None else f"{style} :"
  if rng is None:
    raise ValueError("caption_length_prompt: training needs an rng to draw the length noise")
  if rng.random() > 0.1:
    # int() truncates toward zero, as the reference does.
    n = (len(target) + int(rng.normal(scale=25))) // 15
    return f"{style} {n}:"
  return f"{style} :"


def format_messages(messages: Sequence[str], message_format: str = "role",
                    always_start_with_space: bool = True) -> list[str]:
  """Chat strings of alternating user/assistant turns (the reference's olmo/data/data_formatter.py (chat format)).

  format_messages(["q", "a"]) == [" User: q Assistant:", " a"]; EOS is added at tokenisation.
  `message_format="none"` (captioning stage) only adds the spaces.
  """
  if message_format not in ("role", "none"):
    raise ValueError(f"message_format must be 'role' or 'none', got {message_format!r}")
  out = []
  for index, message in enumerate(messages):
    if not isinstance(message, str):
      raise TypeError(f"message {index} must be a str, got {type(message).__name__}")
    if message_format == "role" and index % 2 == 0:
      message = "User: " + message + " Assistant:"
    if index != 0 or always_start_with_space:
      message = " " + message
    out.append(message)
  return out


def format_multiple_choice(question: str, options: Sequence[str], answer_index: int | None = None,
                           labelled: bool = True) -> tuple[str, str | None]:
  """Multiple-choice prompt and target (the reference's olmo/data/data_formatter.py (prompt templates)).

  Labelled: "{question}\\nA: opt1\\nB: opt2\\n", target the letter. Unlabelled (AI2D diagrams whose
  options are letters drawn in the image): "{question}\\nopt1\\nopt2\\n", target the option text.
  """
  if not options:
    raise ValueError("format_multiple_choice: options is empty")
  if labelled and len(options) > len(MULTIPLE_CHOICE_LABELS):
    # The reference zips with "ABCDEFG" and would silently drop the rest.
    raise ValueError(f"format_multiple_choice: {len(options)} options, at most "
                     f"{len(MULTIPLE_CHOICE_LABELS)} labels ({MULTIPLE_CHOICE_LABELS})")
  if answer_index is not None and not 0 <= answer_index < len(options):
    raise ValueError(f"format_multiple_choice: answer_index {answer_index} is outside "
                     f"{len(options)} options")
  names = list(MULTIPLE_CHOICE_LABELS[:len(options)]) if labelled else list(options)
  lines = [f"{name}: {opt}" for name, opt in zip(names, options)] if labelled else list(options)
  prompt = question + "\n" + "\n".join(lines) + "\n"
  return prompt, (None if answer_index is None else names[answer_index])

