"""Evaluation metrics: the public entry point (the reference's launch_scripts/eval_downstream.py).

Each metric is a pure function of one example, `metric(prediction, references/targets, ...)`,
returning a float or a dict of floats; `average_metrics` and `per_category_average` turn lists of
those into benchmark numbers. The implementations live by family:

  metrics_vqa               VQA score, A-OKVQA, ANLS, relaxed correctness, EM, multiple choice,
                            AI2D subsets, RealWorldQA, VQA prediction clean-up
  metrics_mmmu              MMMU multiple-choice / open parsing and scoring
  metrics_mathvista         MathVista extraction (rule-based or caller-supplied) and scoring
  metrics_counting_pointing counting (CountBench, PixMo-Count) and pointing P/R/F1

Benchmark -> metric (the reference's olmo/eval/evaluators.py (metrics)): AI2D ai2d_mc_scores; ChartQA relaxed_correctness (+exact_match);
VQAv2, TextVQA vqa_score; DocVQA, InfoVQA anls (+exact_match); RealWorldQA real_world_qa_score;
MMMU mmmu_score; MathVista math_vista_score; CountBenchQA, PixMo-Count count_metrics["correct"];
A-OKVQA mc_score / a_okvqa_score; PixMo-Points pointing_metrics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence

from molmo_jax.evals.metrics_counting_pointing import (count_metrics, is_point_in_mask,
                                                       parse_count, pointing_f1, pointing_metrics)
from molmo_jax.evals.metrics_mathvista import (math_vista_score, normalize_extracted_answer,
                                               rule_based_extract_answer,
                                               simplify_math_vista_question)
from molmo_jax.evals.metrics_mmmu import (MMMU_RANDOM_SEED, eval_multi_choice, eval_open,
                                          mmmu_score, parse_multi_choice_response,
                                          parse_open_response)
from molmo_jax.evals.metrics_vqa import (a_okvqa_score, ai2d_mc_scores, anls, clean_vqa_prediction,
                                         exact_match, mc_score, normalize_vqa_answer,
                                         real_world_qa_score, relaxed_correctness, select_mc_option,
                                         vqa_score)


def average_metrics(per_example: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean of every key over the examples that report it.

  A key missing from an example means "not counted there" (the AI2D subsets rely on this); an
  empty input gives an empty dict. Booleans count as 0/1; NaN is refused.
  """
  sums: dict[str, float] = {}
  counts: dict[str, int] = {}
  for i, example in enumerate(per_example):
    for key, value in example.items():
      value = float(value)
      if math.isnan(value):
        raise ValueError(f"per_example[{i}][{key!r}] is NaN")
      sums[key] = sums.get(key, 0.0) + value
      counts[key] = counts.get(key, 0) + 1
  return {key: sums[key] / counts[key] for key in sums}


def _category_order(category: Hashable):
  # Numbers in numeric order first (counts 2, 10 not "10", "2"), then anything else as text.
  if isinstance(category, numbers.Real):
    return (0, float(category), "")
  return (1, 0.0, str(category))


def per_category_average(scores: Sequence[float], categories: Sequence[Hashable],
                         name: str = "correct") -> dict[str, float]:
  """Mean score per category plus the unweighted mean over categories.

  Returns `{f"{name}_{category}": mean, ..., f"{name}_per_category_average": mean of those}`;
  for counting, categories are the GT counts (the reference's `correct_{k}`).
  """
  if len(scores) != len(categories):
    raise ValueError(
      f"scores and categories must have the same length, got {len(scores)} and {len(categories)}")
  groups: dict[Hashable, list[float]] = {}
  for score, category in zip(scores, categories):
    groups.setdefault(category, []).append(float(score))
  ordered = sorted(groups, key=_category_order)
  out = {f"{name}_{c}": sum(groups[c]) / len(groups[c]) for c in ordered}
  if groups:
    out[f"{name}_per_category_average"] = sum(out.values()) / len(groups)
  return out


__all__ = [
  "MMMU_RANDOM_SEED", "a_okvqa_score", "ai2d_mc_scores", "anls", "average_metrics",
  "clean_vqa_prediction", "count_metrics", "eval_multi_choice", "eval_open", "exact_match",
  "is_point_in_mask", "math_vista_score", "mc_score", "mmmu_score", "normalize_extracted_answer",
  "normalize_vqa_answer", "parse_count", "parse_multi_choice_response", "parse_open_response",
  "per_category_average", "pointing_f1", "pointing_metrics", "real_world_qa_score",
  "relaxed_correctness", "rule_based_extract_answer", "select_mc_option",
  "simplify_math_vista_question", "vqa_score",
]
