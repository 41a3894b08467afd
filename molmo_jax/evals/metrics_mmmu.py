"""MMMU answer parsing and scoring (the reference's olmo/eval/evaluators.py (metrics) `mmmu_score`), re-written from the benchmark's
official rules (MMMU `main_parse_and_eval.py`, as vendored by the reference).

Multiple choice: find "(A)" style mentions, else " A " style, else (for answers longer than five
words) the option texts; the LAST mention wins when several are found; nothing found -> a random
letter from a seeded generator. Open questions: keep the tails after key phrases ("is", "so",
"therefore", "answer", "=" on the last line, ...), add every number found in them, normalise
(numbers -> float rounded to 2 decimals, strings lower-cased) and accept when a gold number is
among them or a gold string is a substring of one of them.

Quirk kept from the official code: the sentence split `\\.\\s(?=[A-Z])` runs after lower-casing, so
only newlines split a response into sub-responses.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence

# The official script seeds Python's global generator with 42 once at import and then draws from it
# for every unparseable answer, so a given answer's fallback depends on how many came before.
MMMU_RANDOM_SEED = 42


def parse_multi_choice_response(response: str, all_choices: Sequence[str],
                                index2ans: Mapping[str, str],
                                rng: random.Random | None = None) -> str:
  """The option letter a multiple-choice response names.

  Args:
    response: model output.
    all_choices: option letters, e.g. ["A", "B", "C", "D"].
    index2ans: letter -> option text.
    rng: generator for the random fallback. None uses a fresh `random.Random(42)` (deterministic
      per call). Share one `random.Random(MMMU_RANDOM_SEED)` across a whole evaluation, in dataset
      order, to reproduce the official sequence of fallback draws.
  """
  if not all_choices:
    raise ValueError("all_choices is empty")
  for char in ",.!?;:'":
    response = response.strip(char)
  # Padding lets " A " match a letter at either end.
  padded = f" {response} "
  lowered = padded.lower()

  bracketed = [c for c in all_choices if f"({c})" in padded]
  if bracketed:
    return max(bracketed, key=lambda c: padded.rfind(f"({c})"))
  spaced = [c for c in all_choices if f" {c} " in padded]
  if spaced:
    return max(spaced, key=lambda c: padded.rfind(f" {c} "))
  if len(padded.split()) > 5:
    by_text = [c for c in index2ans if index2ans[c].lower() in lowered]
    if by_text:
      return max(by_text, key=lambda c: lowered.rfind(index2ans[c].lower()))
  rng = random.Random(MMMU_RANDOM_SEED) if rng is None else rng
  return rng.choice(list(all_choices))


def _is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
  except ValueError:
    return False
  return True


def normalize_mmmu_answer(text: str) -> list[str | float]:
  """A number -> [float rounded to 2 decimals]; a string -> [lower-case] (single characters are
  padded with a space on either side so "a" does not match inside any word)."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  if len(text) == 1:
    return [" " + text, text + " "]
  return [text]


# Numbers with thousands separators, scientific notation, and plain decimals/integers that are
# neither the mantissa of scientific notation nor part of a comma-grouped number.
_COMMA_NUMBER = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC_NUMBER = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
  """All number strings in `text`: comma-grouped first, then scientific, then plain."""
  return (_COMMA_NUMBER.findall(text) + _SCIENTIFIC_NUMBER.findall(text)
          + _PLAIN_NUMBER.findall(text))


_KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = frozenset(":,.!?;'")


def _key_sub_responses(response: str) -> list[str]:
  response = response.strip().strip(".").lower()
  parts = re.split(r"\.\s(?=[A-Z])|\n", response)
  keys = []
  for index, part in enumerate(parts):
    # The last sub-response may be a bare equation: its right-hand side is a candidate too.
    phrases = _KEY_PHRASES + ("=",) if index == len(parts) - 1 else _KEY_PHRASES
    shortest = ""
    for phrase in phrases:
      if phrase in part:
        tail = part.split(phrase)[-1].strip()
        # The shortest tail is the most specific. An empty tail (phrase at the very end) is
        # replaced by any later one, longer or not, as in the official loop.
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest not in _TRIVIAL_TAILS:
      keys.append(shortest)
  return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
  """Normalised candidate answers of an open question (strings and floats, duplicates removed)."""
  keys = _key_sub_responses(response)
  candidates = list(keys)
  for key in keys:
    candidates.extend(extract_numbers(key))
  normalised = [value for candidate in candidates for value in normalize_mmmu_answer(candidate)]
  return list(dict.fromkeys(normalised))


def eval_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
  """Exact letter match with the gold letter (or any of several gold letters)."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  return pred in golds


def eval_open(gold: str | Sequence[str], pred: Sequence[str | float]) -> bool:
  """A candidate float equal to a normalised gold number, or a gold string inside a candidate."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  norm_golds = [value for g in golds for value in normalize_mmmu_answer(g)]
  for candidate in pred:
    if isinstance(candidate, str):
      if any(isinstance(g, str) and g in candidate for g in norm_golds):
        return True
    elif candidate in norm_golds:
      return True
  return False


def mmmu_score(prediction: str, target: str | Sequence[str], question_type: str,
               options: Sequence[str] | None = None, rng: random.Random | None = None) -> float:
  """MMMU accuracy of one answer.

  Args:
    prediction: model output.
    target: gold letter(s) for "multiple-choice", gold answer(s) for "open".
    question_type: "multiple-choice" or "open".
    options: option texts for multiple choice (empty strings are dropped, letters A.. assigned).
    rng: see `parse_multi_choice_response`.
  """
  if question_type == "multiple-choice":
    texts = [o for o in (options or []) if len(o) > 0]
    if not texts:
      raise ValueError("options must hold at least one non-empty option for multiple-choice")
    if len(texts) > 26:
      raise ValueError(f"options must have at most 26 entries, got {len(texts)}")
    letters = list(string.ascii_uppercase[:len(texts)])
    pred = parse_multi_choice_response(prediction, letters, dict(zip(letters, texts)), rng)
    return float(eval_multi_choice(target, pred))
  if question_type == "open":
    return float(eval_open(target, parse_open_response(prediction)))
  raise ValueError(f"question_type must be 'multiple-choice' or 'open', got {question_type!r}")
