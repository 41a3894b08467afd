"""MathVista (testmini) scoring (the reference's olmo/eval/evaluators.py (metrics) `math_vista_score`).

The reference (and the paper) extracts the final answer from the response with a gpt-4-0613
few-shot prompt, then normalises it by answer type and compares it exactly with the gold answer.

DEVIATION: we ship a rule-based extractor (`rule_based_extract_answer`) so scoring runs offline.
It handles the short answers Molmo gives under the `eval_short_answer` / `eval_multiple_choice`
styles well, but long free-form reasoning can be extracted differently from GPT-4, so numbers may
differ slightly from the paper. Callers that have an OpenAI-compatible endpoint can plug in their
own extractor: `math_vista_score(pred, metadata, extractor=my_llm_extractor)`, where
`my_llm_extractor(response, metadata) -> str` builds its prompt from `metadata["query"]`. This
module never makes network calls.

DEVIATION: float answers are rounded with `int(precision)` as in the official MathVista script.
The reference passes `precision` unconverted to `round()`; if the dataset stores it as a float
(e.g. 1.0) that raises, is swallowed, and every float question scores 0 there.

`metadata` holds the dataset fields: question_type ("multi_choice" | "free_form"), answer_type
("text" | "integer" | "float" | "list"), choices (list or None), precision, answer, query.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from rapidfuzz.distance import Levenshtein

Extractor = Callable[[str, dict], str]

_REQUIRED_KEYS = ("question_type", "answer_type", "choices", "precision", "answer")


def simplify_math_vista_question(question: str) -> str:
  """The prompt the reference asks: text after the last "Question:" and before the first "Hint:"."""
  return question.split("Question:")[-1].split("Hint:")[0].strip()


def _option_letters(choices) -> list[str]:
  return [chr(ord("A") + i) for i in range(len(choices or []))]


# A number with optional thousands separators and decimals, or a bare decimal like ".5".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Phrases after which the final value usually follows; the LAST such phrase counts.
_ANSWER_CUE_RE = re.compile(r"(?:answer\s*(?:is|:)|\bis\b|=)", re.IGNORECASE)
_NUMBER_WORDS = {
  "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
  "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
  "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20}


def _final_number(response: str) -> str | None:
  """The first number after the last answer cue that has one, else the last number."""
  for cue in reversed(list(_ANSWER_CUE_RE.finditer(response))):
    match = _NUMBER_RE.search(response, cue.end())
    if match:
      return match.group(0).replace(",", "")
  numbers = _NUMBER_RE.findall(response)
  if numbers:
    return numbers[-1].replace(",", "")
  words = [w for w in re.findall(r"[a-z]+", response.lower()) if w in _NUMBER_WORDS]
  return str(_NUMBER_WORDS[words[-1]]) if words else None


def _extract_choice(response: str, choices) -> str:
  letters = _option_letters(choices)
  letter_set = "".join(letters)
  stripped = response.strip()
  # Letters are matched upper-case only so the article "a" is never read as option A.
  patterns = (
    rf"^\(?([{letter_set}])\)?(?:[.:)]|\s*$)",                      # "B", "(B)", "B.", "B: 8/11"
    rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([{letter_set}])\b",  # "The answer is B"
  )
  for pattern in patterns:
    matches = re.findall(pattern, stripped)
    if matches:
      return matches[-1]
  # An option text mentioned in the response: the last mention, the longer text on ties.
  lowered = stripped.lower()
  mentioned = [(lowered.rfind(str(c).lower()), len(str(c)), i) for i, c in enumerate(choices)
               if str(c).lower() in lowered]
  if mentioned:
    return letters[max(mentioned)[2]]
  return stripped


def _extract_list(response: str) -> str:
  brackets = re.findall(r"\[[^\[\]]*\]", response)
  if brackets:
    items = [item.strip() for item in brackets[-1][1:-1].split(",") if item.strip()]
    return "[" + ", ".join(items) + "]"
  numbers = [n.replace(",", "") for n in _NUMBER_RE.findall(response)]
  return "[" + ", ".join(numbers) + "]" if len(numbers) > 1 else response.strip()


def _extract_text(response: str) -> str:
  text = response.strip()
  text = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", text, flags=re.IGNORECASE)
  return text.rstrip(".").strip()


def rule_based_extract_answer(response: str, metadata: Mapping) -> str:
  """Offline stand-in for the GPT-4 extraction step (see the module docstring)."""
  if metadata["question_type"] == "multi_choice":
    return _extract_choice(response, metadata["choices"])
  answer_type = metadata["answer_type"]
  if answer_type in ("integer", "float"):
    number = _final_number(response)
    return response.strip() if number is None else number
  if answer_type == "list":
    return _extract_list(response)
  return _extract_text(response)


def _quick_extraction(response: str, metadata: Mapping) -> str | None:
  """Answers the reference accepts without calling the extractor (already a choice or a number)."""
  if response == "":
    return ""
  if metadata["question_type"] == "multi_choice" and response in (metadata["choices"] or []):
    return response
  try:
    if metadata["answer_type"] == "integer":
      return str(int(response))
    if metadata["answer_type"] == "float":
      return str(float(response))
  except ValueError:
    pass
  return None


def _most_similar(prediction: str, choices) -> str:
  distances = [Levenshtein.distance(prediction, str(choice)) for choice in choices]
  return choices[distances.index(min(distances))]


def normalize_extracted_answer(extraction, choices, question_type: str, answer_type: str,
                               precision) -> str | None:
  """Maps an extracted answer onto the gold answer's form (MathVista's official normalisation).

  Multiple choice: a letter followed by ':' anywhere is taken as the option letter (note that
  "Answer: B" therefore yields "R"); a valid letter becomes its option text, anything else the
  option text at the smallest edit distance. Integer/float/list: converted, None when impossible.
  """
  if question_type == "multi_choice":
    if not choices:
      raise ValueError("choices must be non-empty for a multi_choice question")
    text = extraction.strip() if isinstance(extraction, str) else str(extraction)
    letter = re.findall(r"([a-zA-Z]):", text)
    if letter:
      text = letter[0].upper()
    letters = _option_letters(choices)
    if text in letters:
      return choices[letters.index(text)]
    return _most_similar(text, choices)
  try:
    if answer_type == "integer":
      return str(int(float(extraction)))
    if answer_type == "float":
      return str(round(float(extraction), int(precision)))
  except (TypeError, ValueError, OverflowError):
    return None
  if answer_type == "list":
    return str(extraction)
  return extraction


def math_vista_score(prediction: str, metadata: Mapping,
                     extractor: Extractor | None = None) -> float:
  """1.0 iff the extracted, normalised answer equals `metadata["answer"]`.

  Args:
    prediction: model output.
    metadata: dataset fields (see the module docstring).
    extractor: `(response, metadata) -> extracted answer`, called only when the response is not
      already a valid choice / number; None uses `rule_based_extract_answer`.
  """
  missing = [k for k in _REQUIRED_KEYS if k not in metadata]
  if missing:
    raise KeyError(f"metadata is missing MathVista fields {missing}")
  extraction = _quick_extraction(prediction, metadata)
  if extraction is None:
    extract = rule_based_extract_answer if extractor is None else extractor
    extraction = extract(prediction, dict(metadata))
  normalised = normalize_extracted_answer(
    extraction, metadata["choices"], metadata["question_type"], metadata["answer_type"],
    metadata["precision"])
  return float(normalised == metadata["answer"])
