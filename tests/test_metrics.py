"""Tests for the aggregation helpers of molmo_jax.evals.metrics."""

import numpy as np
import pytest

from molmo_jax.evals import metrics
from molmo_jax.evals.metrics import (ai2d_mc_scores, average_metrics, count_metrics,
                                     per_category_average)


def test_average_metrics_means_each_key_over_reporting_examples():
  per_example = [{"a": 1.0, "b": 0.0}, {"a": 0.0}, {"a": 1.0, "b": True}]
  assert average_metrics(per_example) == {"a": pytest.approx(2 / 3), "b": 0.5}


def test_average_metrics_empty_and_nan():
  assert average_metrics([]) == {}
  with pytest.raises(ValueError, match=r"per_example\[1\]\['a'\] is NaN"):
    average_metrics([{"a": 1.0}, {"a": float("nan")}])


def test_average_metrics_builds_the_ai2d_subset_means():
  options = ["A", "B", "C"]
  per_example = [
    ai2d_mc_scores("A", options, 0, abc_label=False, has_transparent_box=False),  # both: right
    ai2d_mc_scores("B", options, 0, abc_label=True, has_transparent_box=True),  # transp.: wrong
    ai2d_mc_scores("C", options, 2, abc_label=True, has_transparent_box=False),   # opaque: right
  ]
  assert average_metrics(per_example) == {"mc_ai2d_transparent": 0.5, "mc_ai2d_opaque": 1.0}


def test_per_category_average_orders_numbers_numerically():
  out = per_category_average([1, 0, 1, 1, 0], [10, 2, 2, 3, 10])
  assert list(out) == ["correct_2", "correct_3", "correct_10", "correct_per_category_average"]
  assert out["correct_2"] == 0.5 and out["correct_3"] == 1.0 and out["correct_10"] == 0.5
  assert out["correct_per_category_average"] == pytest.approx(2 / 3)


def test_per_category_average_names_and_errors():
  out = per_category_average([1.0, 0.0], ["cat", np.int64(4)], name="f1")
  assert out == {"f1_4": 0.0, "f1_cat": 1.0, "f1_per_category_average": 0.5}
  assert per_category_average([], []) == {}
  with pytest.raises(ValueError, match="same length"):
    per_category_average([1.0], [1, 2])


def test_counting_benchmark_summary():
  predictions = ["a total of 2.", "3", "There are none.", "five", "cats"]
  gt_counts = [2, 4, 0, 5, 5]
  per_example = [count_metrics(p, g) for p, g in zip(predictions, gt_counts)]
  summary = average_metrics(per_example)
  assert summary == {"correct": 0.6, "close": 0.8, "valid": 0.8}
  by_count = per_category_average([e["correct"] for e in per_example], gt_counts)
  assert by_count == {"correct_0": 1.0, "correct_2": 1.0, "correct_4": 0.0, "correct_5": 0.5,
                      "correct_per_category_average": 0.625}


def test_public_names_are_exported():
  for name in metrics.__all__:
    assert callable(getattr(metrics, name)) or name == "MMMU_RANDOM_SEED"
