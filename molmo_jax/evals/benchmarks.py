"""Per-benchmark rows -> examples (prompt, style, targets) and predictions -> scores (the reference's olmo/data/data_formatter.py (style prefixes); launch_scripts/eval_downstream.py).

Each `parse_*` maps one raw row (see readers.py for the storage formats) to an `EvalExample`, raising
`BadRow` for a row that cannot be evaluated. Each `score_*` maps the decoded answer of one example
to a dict of per-example scores, or None when the example has no ground truth (a test split scored
by a server). Prompts follow the reference's `uber_model` templates with the style prefixes of
`demo_or_style` prompting; see docs/evaluation.md for every deviation.

Legend: K = ground-truth points of a pointing example, [H, W] its image.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import random
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from molmo_jax.evals import metrics
from molmo_jax.evals.readers import BadRow, Table, first_present, load_json, resolve_image
from molmo_jax.preprocess import points as points_lib
from molmo_jax.preprocess.tokens import MULTIPLE_CHOICE_LABELS, format_multiple_choice, with_style

# The reference's deterministic choice (first template) for datasets without a question.
POINT_COUNT_PROMPT = "How many {label} are there?"
POINTING_PROMPT = "Point to {label}\nPlease say 'This isn't in the image.' if it is not in the image."
RWQA_SHORT_ANSWER = "Please answer directly with a single word or number."
RWQA_MULTIPLE_CHOICE = "Please answer directly with only the letter of the correct option and nothing else."
COUNTBENCH_QUESTIONS_FILE = "countbench_paired_questions.json"
_IMAGE_OPTION = re.compile(r"<img='(.*?)'>")
_ABC_OPTION = re.compile(r"[A-Za-z]{1,2}")
# Modes that decode to a 2-D array; the reference's CountBenchQA builder drops those images.
_SINGLE_CHANNEL_MODES = frozenset({"1", "L", "P", "I", "F", "I;16"})


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One question to ask. `targets` is JSON-ready (written beside the prediction); `info` holds
  the other scoring inputs (option names, masks, ...), which may be arrays."""

  id: str
  image: Any                      # encoded bytes, a file path, an array, or None (no image)
  prompt: str                     # the user question, without the style prefix
  style: str | None
  targets: Any
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def full_prompt(self) -> str:
    """What the model is asked: "{style}: {prompt}" (no prefix for demo styles, the reference's olmo/data/data_formatter.py (style prefixes))."""
    return with_style(self.prompt, self.style)


def _answers(value: Any) -> list[str] | None:
  """A list of reference answers from a str, a list of str, or VQA's [{"answer": ...}] records."""
  if value is None:
    return None
  if isinstance(value, str):
    return [value]
  answers = [a["answer"] if isinstance(a, Mapping) else a for a in value]
  if not answers or not all(isinstance(a, str) for a in answers):
    raise BadRow(f"answers: expected strings, got {value!r:.120}")
  return answers


def _text(value: Any, field: str) -> str:
  if not isinstance(value, str):
    raise BadRow(f"field {field!r}: expected text, got {type(value).__name__}")
  return value


# --------------------------------------------------------------------------------------------
# Short-answer VQA (VQA v2, TextVQA, DocVQA, InfographicVQA, ChartQA)
# --------------------------------------------------------------------------------------------

def short_answer_parser(style: str, image_fields: Sequence[str] = ("image",),
                        question_fields: Sequence[str] = ("question",),
                        answer_fields: Sequence[str] = ("answers",),
                        image_name=None, extra_dirs: Sequence[str] = ()):
  """Parser for a short-answer task; `image_name(row)` builds a file name from other fields."""

  def parse(row: dict, row_id: str, table: Table) -> EvalExample:
    image = first_present(row, *image_fields, default=None)
    if image is None and image_name is not None:
      image = image_name(row)
    dirs = tuple(table.image_dirs) + tuple(d / extra for d in table.image_dirs for extra in extra_dirs)
    question = _text(first_present(row, *question_fields), question_fields[0])
    answers = _answers(first_present(row, *answer_fields, default=None))
    info = {}
    if row.get("human_or_machine") is not None:
      info["is_human"] = bool(row["human_or_machine"])
    return EvalExample(row_id, resolve_image(image, dirs), question, style, answers, info)

  return parse


def textvqa_image_name(row: dict) -> str | None:
  return f"{row['image_id']}.jpg" if row.get("image_id") else None


def score_vqa(prediction: str, example: EvalExample, image_size=None) -> dict | None:
  if example.targets is None:
    return None
  return {"vqa_score": metrics.vqa_score(metrics.clean_vqa_prediction(prediction), example.targets)}


def score_anls(prediction: str, example: EvalExample, image_size=None) -> dict | None:
  if not example.targets:
    return None
  answer = metrics.clean_vqa_prediction(prediction)
  return {"anls": metrics.anls(answer, example.targets),
          "em": metrics.exact_match(answer, example.targets)}


def score_chartqa(prediction: str, example: EvalExample, image_size=None) -> dict | None:
  if not example.targets:
    return None
  answer = metrics.clean_vqa_prediction(prediction)
  scores = {"relaxed_correctness": metrics.relaxed_correctness(answer, example.targets),
            "em": metrics.exact_match(answer, example.targets)}
  if "is_human" in example.info:
    part = "human" if example.info["is_human"] else "aug"
    scores.update({f"{k}_{part}": v for k, v in list(scores.items())})
  return scores


# --------------------------------------------------------------------------------------------
# Multiple choice (AI2D, MMMU, MathVista, RealWorldQA)
# --------------------------------------------------------------------------------------------

def _distinct_names(names: Sequence[str]) -> list[str]:
  normalised = [n.lower().strip() for n in names]
  if len(set(normalised)) != len(normalised):
    raise BadRow(f"options are not distinct after lower-casing: {list(names)}")
  return list(names)


def parse_ai2d(row: dict, row_id: str, table: Table) -> EvalExample:
  """AI2D in the reference's built format (answer_texts, correct_answer, abc_label, ...) or the
  common (question, options, answer index) export, where abc options are recognised by shape."""
  question = _text(row["question"], "question")
  if "answer_texts" in row:
    options = list(row["answer_texts"])
    answer_idx = int(row["correct_answer"])
    option_is_abc = list(row.get("option_is_abc") or [False] * len(options))
    abc_label = bool(row.get("abc_label"))
    transparent = bool(row.get("has_transparent_box"))
  else:
    options = list(first_present(row, "options", "choices"))
    answer_idx = int(first_present(row, "answer", "correct_answer"))
    option_is_abc = [bool(_ABC_OPTION.fullmatch(str(o).strip())) for o in options]
    abc_label = bool(row.get("abc_label", sum(option_is_abc) >= len(options) - 1 > 0))
    transparent = bool(row.get("has_transparent_box", False))
  if not 0 <= answer_idx < len(options):
    raise BadRow(f"answer index {answer_idx} outside {len(options)} options")
  if abc_label and sum(option_is_abc) >= len(options) - 1:
    names = _distinct_names([o.upper() if abc else o for o, abc in zip(options, option_is_abc)])
    prompt, _ = format_multiple_choice(question, names, labelled=False)
    style = "ai2_diagram_no_letter"
  else:
    prompt, _ = format_multiple_choice(question, options)
    names, style = list(MULTIPLE_CHOICE_LABELS[:len(options)]), "ai2_diagram"
  image = resolve_image(first_present(row, "image", "image_path", default=None), table.image_dirs)
  info = {"option_names": names, "abc_label": abc_label, "has_transparent_box": transparent}
  return EvalExample(row_id, image, prompt, style,
                     {"answer_idx": answer_idx, "answer": names[answer_idx]}, info)


def score_ai2d(prediction: str, example: EvalExample, image_size=None) -> dict:
  info = example.info
  return metrics.ai2d_mc_scores(metrics.clean_vqa_prediction(prediction), info["option_names"],
                                example.targets["answer_idx"], info["abc_label"],
                                info["has_transparent_box"])


def parse_realworldqa(row: dict, row_id: str, table: Table) -> EvalExample:
  """RealWorldQA, `no_instruction` mode: short-answer prompts lose their instruction line."""
  prompt = _text(row["question"], "question")
  answer = str(row["answer"]).strip()
  if RWQA_SHORT_ANSWER in prompt:
    question_type, style = "short_answer", "eval_short_answer"
    prompt = prompt.split("\n")[0]
  elif RWQA_MULTIPLE_CHOICE in prompt:
    question_type, style = "multiple_choice", "eval_multiple_choice"
    if answer not in "ABCD" or len(answer) != 1:
      raise BadRow(f"multiple-choice answer {answer!r} is not a letter A-D")
  else:
    raise BadRow("question has neither RealWorldQA instruction line")
  image = resolve_image(row.get("image"), table.image_dirs)
  return EvalExample(row_id, image, prompt, style, answer, {"question_type": question_type})


def score_realworldqa(prediction: str, example: EvalExample, image_size=None) -> dict:
  return {"real_world_qa_score": metrics.real_world_qa_score(
      metrics.clean_vqa_prediction(prediction), example.targets, example.info["question_type"])}


def _mmmu_options(value: Any) -> list[str]:
  if isinstance(value, str):
    # The dataset stores the list as its Python repr; literal_eval reads it without eval's risks.
    value = ast.literal_eval(value)
  if not isinstance(value, (list, tuple)):
    raise BadRow(f"options: expected a list, got {type(value).__name__}")
  return [str(o) for o in value]


def parse_mmmu(row: dict, row_id: str, table: Table) -> EvalExample:
  question_type = row["question_type"]
  question = _text(row["question"], "question")
  info: dict[str, Any] = {"question_type": question_type}
  image_value = first_present(row, "image_1", "image", default=None)
  drop_image = False
  if question_type == "multiple-choice":
    options = _mmmu_options(row["options"])
    info["options"] = options
    # The reference labels options with "abcdefg" only: later options are not shown (DEVIATION
    # kept); scoring still sees all of them.
    prompt, _ = format_multiple_choice(question, options[:len(MULTIPLE_CHOICE_LABELS)])
    style = "a_okvqa_mc"
    # As the reference (after LLaVA): images given as options mean the question image is dropped.
    drop_image = sum(bool(_IMAGE_OPTION.match(o)) for o in options) > 1
  elif question_type == "open":
    prompt, style = question, "vqa2"
  else:
    raise BadRow(f"question_type {question_type!r} is neither 'multiple-choice' nor 'open'")
  image = None if drop_image else resolve_image(image_value, table.image_dirs, "image_1")
  return EvalExample(row_id, image, prompt, style, row["answer"], info)


def score_mmmu(prediction: str, example: EvalExample, image_size=None) -> dict:
  # One seeded generator per example (not one global stream) so resumed runs score identically.
  rng = random.Random(f"{metrics.MMMU_RANDOM_SEED}:{example.id}")
  return {"mmmu_score": metrics.mmmu_score(metrics.clean_vqa_prediction(prediction),
                                           example.targets, example.info["question_type"],
                                           example.info.get("options"), rng=rng)}


def parse_mathvista(row: dict, row_id: str, table: Table) -> EvalExample:
  question = metrics.simplify_math_vista_question(_text(row["question"], "question"))
  choices = list(row["choices"]) if row.get("choices") else None
  info = {"question_type": row["question_type"], "answer_type": row["answer_type"],
          "choices": choices, "precision": row.get("precision"), "answer": row["answer"],
          "query": row.get("query", row["question"])}
  if row["question_type"] == "multi_choice":
    if not choices:
      raise BadRow("multi_choice question without choices")
    prompt, _ = format_multiple_choice(question, choices)
    style = "eval_multiple_choice"
  else:
    prompt, style = question, "eval_short_answer"
  image = resolve_image(first_present(row, "decoded_image", "image", default=None), table.image_dirs)
  return EvalExample(row_id, image, prompt, style, row["answer"], info)


def score_mathvista(prediction: str, example: EvalExample, image_size=None) -> dict:
  # The reference scores the raw answer here, without the VQA clean-up.
  return {"math_vista_score": metrics.math_vista_score(prediction.strip(), example.info)}


# --------------------------------------------------------------------------------------------
# Counting and pointing (CountBenchQA, PixMo-Count, PixMo-Points)
# --------------------------------------------------------------------------------------------

def _count(value: Any) -> int:
  if isinstance(value, bool) or int(value) != value or int(value) < 0:
    raise BadRow(f"count: expected a non-negative integer, got {value!r}")
  return int(value)


def _reject_single_channel(image: Any) -> None:
  if not isinstance(image, (bytes, str)):
    return
  try:
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
      mode = opened.mode
  except OSError as e:
    raise BadRow(f"unreadable image: {e}") from None
  if mode in _SINGLE_CHANNEL_MODES:
    raise BadRow(f"single-channel ({mode}) image: the reference's CountBenchQA drops these")


def parse_countbench(row: dict, row_id: str, table: Table) -> EvalExample:
  """CountBenchQA rows (image, question, count); rows of the raw CountBench parquet (number, no
  question) get the question from countbench_paired_questions.json by row position."""
  question = row.get("question")
  if question is None:
    question = _paired_countbench_question(table, int(row["_row_index"]))
  image = resolve_image(row.get("image"), table.image_dirs)
  _reject_single_channel(image)
  count = _count(first_present(row, "count", "number"))
  return EvalExample(row_id, image, _text(question, "question"), "point_count", {"count": count})


@functools.lru_cache(maxsize=4)
def _countbench_questions(path: Path) -> list:
  return load_json(path)


def _paired_countbench_question(table: Table, index: int) -> str:
  for folder in table.image_dirs:
    path = Path(folder) / COUNTBENCH_QUESTIONS_FILE
    if path.is_file():
      questions = _countbench_questions(path)
      if index >= len(questions):
        raise BadRow(f"row {index} has no question in {path} ({len(questions)} questions)")
      return questions[index]["question"]
  raise BadRow(f"no 'question' field and no {COUNTBENCH_QUESTIONS_FILE} beside the data")


def parse_pixmo_count(row: dict, row_id: str, table: Table) -> EvalExample:
  label = _text(row["label"], "label").lower()
  image = resolve_image(first_present(row, "image", "image_path", default=None), table.image_dirs)
  return EvalExample(row_id, image, POINT_COUNT_PROMPT.format(label=label), "point_count",
                     {"count": _count(row["count"])})


def score_count(prediction: str, example: EvalExample, image_size=None) -> dict:
  return metrics.count_metrics(prediction, example.targets["count"])


def _percent_points(value: Any) -> np.ndarray:
  if isinstance(value, Mapping):             # {"x": [...], "y": [...]}
    return np.stack([np.asarray(value["x"], float), np.asarray(value["y"], float)], -1)
  pts = [(p["x"], p["y"]) if isinstance(p, Mapping) else tuple(p) for p in value or []]
  return np.asarray(pts, np.float64).reshape(-1, 2)


def parse_pixmo_points(row: dict, row_id: str, table: Table) -> EvalExample:
  """PixMo-Points eval: points in percent of the image, one boolean mask per point."""
  label = _text(row["label"], "label").lower()
  points = _percent_points(row["points"])
  masks = np.asarray(row["masks"], dtype=bool)
  if masks.shape[0] != points.shape[0] or (masks.size and masks.ndim != 3):
    raise BadRow(f"masks: expected one [H, W] mask per point ({points.shape[0]}), got shape "
                 f"{masks.shape}")
  image = resolve_image(first_present(row, "image", "image_path", default=None), table.image_dirs)
  return EvalExample(row_id, image, POINTING_PROMPT.format(label=label), "pointing",
                     {"points_percent": points.round(3).tolist()}, {"masks": masks})


def score_pixmo_points(prediction: str, example: EvalExample, image_size) -> dict:
  # DEVIATION: GT points go to pixels before matching; the reference matched pixel predictions
  # against percent GT (see metrics_counting_pointing.pointing_metrics).
  gt = points_lib.percent_to_pixels(np.asarray(example.targets["points_percent"]), image_size) \
      if example.targets["points_percent"] else np.zeros((0, 2))
  return metrics.pointing_metrics(prediction, gt, list(example.info["masks"]), image_size)
