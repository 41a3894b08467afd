"""A small byte-level BPE tokenizer for the demo, trained in-process on the synthetic generator's text.

Why byte-level BPE: its 256-byte base alphabet can spell any string, so decode(encode(text)) == text
holds for every generated answer (and any other text) with no unknown token; the merges learnt from
the demo's own sentences keep sequences short. Digits are always split one per token (as the Qwen2
tokenizer does) so a tiny model learns coordinates digit by digit.

Training is deterministic: the corpus is drawn from a fixed seed and the tokenizers BPE trainer
breaks ties by pair ids, so `build_demo_tokenizer()` gives the same vocabulary on every run (a test
checks this across processes).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from molmo_jax.data import synthetic
from molmo_jax.preprocess.tokens import BUILTIN_TOKENIZERS

EOS_TOKEN = "<|endoftext|>"
DEMO_VOCAB_SIZE = 512
MAX_DEMO_VOCAB_SIZE = 1024
# Letters with an optional leading non-letter (" red", "<point"), single digits, punctuation runs
# with an optional leading space, then whitespace (the Qwen2 pre-tokenizer's shape, own pattern).
_SPLIT_PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CORPUS_SEED = 1234


def chat_text(style: str, question: str, answer: str) -> str:
  """One turn in the reference chat format (the reference's olmo/data/data_formatter.py (chat format); olmo/data/data_formatter.py (style prefixes)), without the EOS token.

  The corpus leaves EOS out because the BPE trainer would otherwise learn merges of its characters.
  """
  return f" User: {style}: {question} Assistant: {answer}"


def _random_points(rng: np.random.Generator, count: int) -> tuple[np.ndarray, tuple[int, int]]:
  width, height = (int(v) for v in rng.integers(16, 1025, size=2))
  points = rng.uniform(0, 1, size=(count, 2)) * np.asarray([width, height])
  return points.astype(np.float32), (width, height)


def _labels() -> list[str]:
  return [synthetic.kind_label(c, s) for c in synthetic.PALETTE for s in synthetic.SHAPES]


def demo_corpus(num_random: int = 600) -> Iterator[str]:
  """Every kind of string the generator and the prompt format produce, plus random answers."""
  rng = np.random.default_rng(_CORPUS_SEED)
  max_count = len(synthetic.NUMBER_WORDS) - 1
  for label in _labels():
    for template in synthetic.COUNT_TEMPLATES:
      yield chat_text("point_count", template.format(label=label), synthetic.NONE_ANSWER)
    for template in synthetic.POINT_TEMPLATES:
      yield chat_text("pointing", template.format(label=label), synthetic.NONE_ANSWER)
  for template in synthetic.CAPTION_TEMPLATES:
    yield chat_text("long_caption", template, synthetic.EMPTY_CAPTION)
  yield " long_caption 12:" + " long_caption :" + " transcript 7:"
  labels = _labels()
  kinds = [(c, s) for c in synthetic.PALETTE for s in synthetic.SHAPES]
  for _ in range(num_random):
    label = labels[rng.integers(len(labels))]
    points, size = _random_points(rng, int(rng.integers(0, max_count + 1)))
    yield chat_text("point_count", synthetic.COUNT_TEMPLATES[0].format(label=label),
                     synthetic.count_answer(points, size, label))
    yield chat_text("pointing", synthetic.POINT_TEMPLATES[0].format(label=label),
                     synthetic.pointing_answer(points, size, label))
    chosen = rng.choice(len(kinds), size=int(rng.integers(1, 4)), replace=False)
    counts = {kinds[i]: int(rng.integers(1, max_count + 1)) for i in chosen}
    yield chat_text("long_caption", synthetic.CAPTION_TEMPLATES[0], synthetic.caption_text(counts))


def build_demo_tokenizer(extra_texts: Iterable[str] = (), vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
  """Trains the demo tokenizer; `extra_texts` add strings whose words should become merges."""
  if not 256 + 1 < vocab_size <= MAX_DEMO_VOCAB_SIZE:
    raise ValueError(f"vocab_size: expected 258..{MAX_DEMO_VOCAB_SIZE} (256 bytes + {EOS_TOKEN} + merges), "
                     f"got {vocab_size}")
  if isinstance(extra_texts, str):
    raise TypeError("extra_texts: expected an iterable of strings, got a single string")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = list(demo_corpus()) + list(extra_texts)
  tokenizer.train_from_iterator(corpus, trainer=trainer)
  return tokenizer


def save_demo_tokenizer(directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> str:
  """Writes tokenizer.json (and a tokenizer_config.json for transformers); returns the json path."""
  tokenizer = tokenizer or build_demo_tokenizer()
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tokenizer.save(path)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN,
            "model_max_length": 4096, "clean_up_tokenization_spaces": False}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return path


def _builtin(vocab_size: int) -> tuple[Tokenizer, str]:
  del vocab_size    # the demo vocabulary (441 entries) fits every demo recipe's vocab_size
  return build_demo_tokenizer(), EOS_TOKEN


# `tokenizer_dir = "builtin:demo"` in a recipe (with this module in config.plugins).
BUILTIN_TOKENIZERS.register("builtin:demo", _builtin)
