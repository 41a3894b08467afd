"""Short-answer and multiple-choice metrics (the reference's launch_scripts/eval_downstream.py (protocol)): VQA score, A-OKVQA, ANLS, ChartQA
relaxed correctness, exact match, option selection, AI2D subsets, RealWorldQA.

Every metric is a pure function `metric(prediction, references, ...) -> float`. Predictions are
expected to have gone through `clean_vqa_prediction` first, as the reference evaluator does.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

# ---------------------------------------------------------------------------------------------
# Official VQA answer normalisation.

# Contracted forms the official VQA script restores when they are written without apostrophes.
# Each key is the form with exactly ONE of its apostrophes removed, which reproduces the official
# table (e.g. "couldnt've" and "couldn'tve" both map to "couldn't've", "couldntve" does not).
_SINGLE_APOSTROPHE = (
  "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd "
  "how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock "
  "oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's "
  "something'd something'll that's there'd there're there's they'd they'll they're they've 'twas "
  "wasn't we've weren't what'll what're what's what've when's where'd where's where've who'd "
  "who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're "
  "you've")
_SEVERAL_APOSTROPHES = (
  "couldn't've hadn't've he'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've "
  "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll "
  "y'all'd've you'd've")


def _contraction_table() -> dict[str, str]:
  table = {}
  for full in (_SINGLE_APOSTROPHE + " " + _SEVERAL_APOSTROPHES).split():
    for i, char in enumerate(full):
      if char == "'":
        table[full[:i] + full[i + 1:]] = full
  # The official table maps this one the wrong way round (it strips the apostrophe); kept so
  # scores match. Its capitalised keys ("Im", "Ive", "I'dve") never match lower-cased text.
  table["somebody'd"] = "somebodyd"
  return table


_CONTRACTIONS = _contraction_table()
_NUMBER_WORDS = {
  "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a mistyped look-behind that
# never fires, so a period is dropped unless a digit follows it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) as the positional `count`: at most 32 periods go.
_MAX_PERIODS_REMOVED = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
  out = text
  # Decided on the untouched input: a thousands separator anywhere means "delete" for every mark.
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for mark in _PUNCTUATION:
    if delete_all or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _process_digits_articles(text: str) -> str:
  words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
  return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
  """Official VQA normalisation: case, punctuation, number words, articles, contractions."""
  text = text.replace("\n", " ").replace("\t", " ").lower().strip()
  return _process_digits_articles(_process_punctuation(text))


def _check_references(references, name: str = "references") -> list[str]:
  if isinstance(references, str):
    raise TypeError(f"{name} must be a list of strings, got the bare string {references!r}")
  refs = list(references)
  if not refs:
    raise ValueError(f"{name} is empty")
  return refs


def vqa_score(prediction: str, references: Sequence[str]) -> float:
  """min(#references equal to the prediction / 3, 1) after VQA normalisation of both.

  The reference's simple form, not the official mean over the 10 leave-one-out subsets. A bare
  string is refused: the reference evaluator would wrap it in a one-element list (max score 1/3).
  """
  refs = _check_references(references)
  counts = collections.Counter(normalize_vqa_answer(r) for r in refs)
  return min(counts[normalize_vqa_answer(prediction)] / 3.0, 1.0)


def a_okvqa_score(prediction: str, references: Sequence[str]) -> float:
  """A-OKVQA direct answer: min(count / 3, 1) with only lower-case + strip normalisation."""
  refs = _check_references(references)
  counts = collections.Counter(r.lower().strip() for r in refs)
  return min(counts[prediction.lower().strip()] / 3.0, 1.0)


def _as_reference_list(references) -> list[str]:
  return [references] if isinstance(references, str) else _check_references(references)


def anls(prediction: str, references: str | Sequence[str], threshold: float = 0.5) -> float:
  """Average normalised Levenshtein similarity (DocVQA / InfographicVQA), max over references.

  Per reference: 1 - ED(lower(t), lower(p)) / max(len(t), len(p)) if that distance is below
  `threshold`, else 0. Two empty strings count as identical (the reference divides by zero).
  """
  best = 0.0
  for ref in _as_reference_list(references):
    longest = max(len(ref), len(prediction))
    if longest == 0:
      return 1.0
    distance = Levenshtein.distance(ref.lower(), prediction.lower()) / longest
    if distance < threshold:
      best = max(best, 1.0 - distance)
  return best


def _chart_number(text: str) -> float | None:
  try:
    if text.endswith("%"):
      return float(text.rstrip("%")) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_correctness(prediction: str, references: str | Sequence[str],
                        max_relative_change: float = 0.05) -> float:
  """ChartQA relaxed accuracy, max over references.

  Numbers (a trailing '%' divides by 100; commas are NOT removed) are correct within
  `max_relative_change` of a non-zero target; anything else, including a zero target, needs a
  case-insensitive exact match.
  """
  pred_value = _chart_number(prediction)
  for ref in _as_reference_list(references):
    target_value = _chart_number(ref)
    if pred_value is not None and target_value:
      correct = abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    else:
      correct = prediction.lower() == ref.lower()
    if correct:
      return 1.0
  return 0.0


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
  """Case-insensitive exact match with any reference (no stripping, as the reference)."""
  return float(prediction.lower() in [r.lower() for r in _as_reference_list(references)])


# ---------------------------------------------------------------------------------------------
# Multiple choice.


def select_mc_option(prediction: str, options: Sequence[str]) -> int:
  """Index of the option a free-form prediction refers to.

  Exact (lower/strip) match with an option name; else the only option containing the prediction;
  else the option at the smallest edit distance (first one on ties).
  """
  if isinstance(options, str) or not options:
    raise ValueError(f"options must be a non-empty list of strings, got {options!r}")
  target = prediction.lower().strip()
  names = [o.lower().strip() for o in options]
  if len(set(names)) != len(names):
    raise ValueError(f"options must be distinct after lower/strip, got {list(options)!r}")
  if target in names:
    return names.index(target)
  containing = [i for i, name in enumerate(names) if target in name]
  if len(containing) == 1:
    return containing[0]
  distances = [Levenshtein.distance(name, target) for name in names]
  return distances.index(min(distances))


def mc_score(prediction: str, option_names: Sequence[str], answer_idx: int) -> float:
  """1.0 iff `select_mc_option` picks the gold option."""
  return float(select_mc_option(prediction, option_names) == answer_idx)


def ai2d_mc_scores(prediction: str, option_names: Sequence[str], answer_idx: int,
                   abc_label: bool, has_transparent_box: bool) -> dict[str, float]:
  """AI2D multiple choice split by box type (`mc_ai2d_transparent` / `mc_ai2d_opaque`).

  Questions on abc-labelled diagrams count only in the subset of their box type, every other
  question in both. Keys absent from the result mean "not counted here", which is how
  `average_metrics` builds the two subset means.
  """
  score = mc_score(prediction, option_names, answer_idx)
  keys = ["mc_ai2d_transparent", "mc_ai2d_opaque"]
  if abc_label:
    keys = ["mc_ai2d_transparent"] if has_transparent_box else ["mc_ai2d_opaque"]
  return {key: score for key in keys}


_RWQA_LETTERS = ("A", "B", "C", "D")


def real_world_qa_score(prediction: str, target: str, question_type: str) -> float:
  """RealWorldQA: option letter A-D for "multiple_choice", else VQA-normalised exact match."""
  if question_type == "multiple_choice":
    if target not in _RWQA_LETTERS:
      raise ValueError(f"target must be one of {_RWQA_LETTERS} for multiple_choice, got {target!r}")
    return float(select_mc_option(prediction, _RWQA_LETTERS) == _RWQA_LETTERS.index(target))
  if question_type != "short_answer":
    raise ValueError(
      f"question_type must be 'multiple_choice' or 'short_answer', got {question_type!r}")
  return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(target))


# ---------------------------------------------------------------------------------------------
# Prediction post-processing.


def clean_vqa_prediction(text: str) -> str:
  """The reference's VqaEval post-processing of a decoded answer.

  Text after the first "Answer:" (up to a second one); else, for several lines, the most frequent
  whitespace-collapsed line (the first one on ties); else the whitespace-collapsed text.
  """
  text = text.strip()
  if "Answer:" in text:
    return text.split("Answer:")[1].strip()
  if "\n" in text:
    lines = [" ".join(line.split()) for line in text.split("\n")]
    counts = collections.Counter(lines)
    top = max(counts.values())
    return next(line for line in lines if counts[line] == top)
  return " ".join(text.split())
