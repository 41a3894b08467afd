"""Counting (CountBenchQA, PixMo-Count) and pointing (PixMo-Points eval) metrics (the reference's olmo/eval/evaluators.py (metrics)).

Legend: K = predicted points, G = ground-truth objects, [H, W] = original image (masks are
per-object boolean [H, W] arrays in original-image pixels, points are (x, y) pixels).

Counting: the number is the last word (digits or a number word zero..twenty), else the N of
"a total of N", else 0 for an answer saying "none". DEVIATION (by default): the reference's "none"
pattern is written `".*\\bnone\\b.*"` in a non-raw string, so `\\b` is a backspace and
"There are none." is never parsed (scored invalid and wrong); `reference_compat=True` reproduces
that.

Pointing: the answer is parsed with `parse_points`; a GT with no objects scores P = R = F1 = 1 iff
nothing is predicted; otherwise an answer that is not a well-formed point list scores 0, and the
rest are matched one-to-one to the GT objects by the Hungarian algorithm on Euclidean pixel
distance. A matched pair counts when the ROUNDED predicted pixel lies inside the matched object's
mask; there is no distance threshold. P = hits / K, R = hits / G.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from molmo_jax.preprocess.points import is_valid_point_format, parse_points

_COUNT_WORDS = {
  "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
  "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
  "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20}
# Greedy prefix from the start without DOTALL: the LAST "a total of N" of the FIRST line, as the
# reference's re.match(".*a total of ([0-9]+).*").
_TOTAL_RE = re.compile(r".*a total of ([0-9]+)")
_NONE_RE = re.compile(r"\bnone\b")


def parse_count(text: str, reference_compat: bool = False) -> int | None:
  """The count a counting answer states, or None when it states none we can read."""
  answer = text.strip().lower().rstrip(".").strip()
  words = answer.split()
  if words:
    try:
      return int(words[-1])
    except ValueError:
      pass
    if words[-1] in _COUNT_WORDS:
      return _COUNT_WORDS[words[-1]]
  total = _TOTAL_RE.match(answer)
  if total:
    return int(total.group(1))
  if not reference_compat and _NONE_RE.search(answer):
    return 0
  return None


def count_metrics(prediction: str, gt_count: int,
                  reference_compat: bool = False) -> dict[str, float]:
  """Per-example counting scores: correct (exact), close (|error| <= 1), valid (count read)."""
  if int(gt_count) != gt_count or gt_count < 0:
    raise ValueError(f"gt_count must be a non-negative integer, got {gt_count!r}")
  count = parse_count(prediction, reference_compat)
  if count is None:
    return {"correct": 0.0, "close": 0.0, "valid": 0.0}
  return {"correct": float(count == gt_count), "close": float(abs(count - gt_count) <= 1),
          "valid": 1.0}


def is_point_in_mask(point, mask: np.ndarray) -> bool:
  """Whether the point, rounded to the nearest pixel, is a True pixel of the [H, W] mask."""
  height, width = mask.shape
  # Python's round() (half to even) as the reference; outside the image is a miss.
  x, y = int(round(float(point[0]))), int(round(float(point[1])))
  if not (0 <= x < width and 0 <= y < height):
    return False
  return bool(mask[y, x])


def _check_gt_points(gt_points_px) -> np.ndarray:
  gt = np.asarray(gt_points_px, np.float64)
  if gt.size == 0:
    return np.zeros((0, 2), np.float64)
  if gt.ndim != 2 or gt.shape[1] != 2:
    raise ValueError(f"gt_points_px must have shape [G, 2] in (x, y) order, got shape {gt.shape}")
  return gt


def _check_masks(masks, num_gt: int) -> list[np.ndarray]:
  masks = [np.asarray(m) for m in masks]
  if len(masks) != num_gt:
    raise ValueError(f"masks must have one [H, W] mask per GT point ({num_gt}), got {len(masks)}")
  for i, m in enumerate(masks):
    if m.ndim != 2:
      raise ValueError(f"masks[{i}] must be a boolean [H, W] array, got shape {m.shape}")
  return masks


def pointing_f1(precision: float, recall: float, epsilon: float = 1e-10) -> float:
  """2PR / (P + R + eps), and exactly 0 when either is 0."""
  if precision == 0 or recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall + epsilon)


def pointing_metrics(prediction: str, gt_points_px, masks: Sequence[np.ndarray], image_size,
                     reference_compat: bool = False) -> dict[str, float]:
  """Precision / recall / F1 of one pointing answer.

  Args:
    prediction: model output.
    gt_points_px: [G, 2] (x, y) GT points in pixels (only used for the assignment cost). The
      reference passes them in percent units (0-100) against pixel predictions; pass them in
      percent here to reproduce that assignment exactly.
    masks: G boolean [H, W] object masks, paired with gt_points_px.
    image_size: (w, h) of the original image, to map predicted percentages to pixels.
    reference_compat: forwarded to `parse_points` (double-counted `Click(...)`).
  """
  gt = _check_gt_points(gt_points_px)
  masks = _check_masks(masks, gt.shape[0])
  predicted = parse_points(prediction, image_size, reference_compat=reference_compat)
  if gt.shape[0] == 0:
    score = float(predicted.shape[0] == 0)
    return {"precision": score, "recall": score, "f1": score}
  if not is_valid_point_format(prediction) or predicted.shape[0] == 0:
    # Well-formed text whose every value exceeds 100 also ends here (the reference would crash).
    return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
  rows, cols = linear_sum_assignment(cdist(predicted, gt))
  hits = sum(is_point_in_mask(predicted[i], masks[j]) for i, j in zip(rows, cols))
  precision = hits / predicted.shape[0]
  recall = hits / len(masks)
  return {"precision": precision, "recall": recall, "f1": pointing_f1(precision, recall)}
