"""Tests for counting and pointing metrics (molmo_jax.evals.metrics_counting_pointing)."""

import numpy as np
import pytest

from molmo_jax.evals.metrics import (count_metrics, is_point_in_mask, parse_count, pointing_f1,
                                     pointing_metrics)

# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize("text,expected", [
  ('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="dogs">dogs</points> shows a '
   'total of 2.', 2),
  ("3", 3),
  ("3.", 3),
  ("   7   ", 7),
  ("count: 4", 4),
  ("five", 5),
  ("Twenty.", 20),
  ("zero", 0),
  ("-2", -2),
  ("twenty-one", None),
  ("There are 5 dogs.", None),                 # the number must be the last word
  ("a total of 12 apples", 12),
  ("a total of 7 a total of 12 x", 12),        # the last "a total of" of the line
  ("I see\na total of 3 cats", None),          # ... of the FIRST line only (reference regex)
  ("There are none.", 0),
  ("None", 0),
  ("none of them", 0),
  ("nonexistent", None),
  ("", None),
  ("many", None),
])
def test_parse_count(text, expected):
  assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["There are none.", "None", "none of them"])
def test_parse_count_reference_compat_never_reads_none(text):
  assert parse_count(text, reference_compat=True) is None


@pytest.mark.parametrize("prediction,gt,expected", [
  ("3", 3, (1.0, 1.0, 1.0)),
  ("4", 3, (0.0, 1.0, 1.0)),
  ("2", 3, (0.0, 1.0, 1.0)),
  ("5", 3, (0.0, 0.0, 1.0)),
  ("cats", 3, (0.0, 0.0, 0.0)),
  ("There are none.", 0, (1.0, 1.0, 1.0)),
  ("There are none.", 1, (0.0, 1.0, 1.0)),
])
def test_count_metrics(prediction, gt, expected):
  scores = count_metrics(prediction, gt)
  assert (scores["correct"], scores["close"], scores["valid"]) == expected


def test_count_metrics_reference_compat_and_bad_gt():
  assert count_metrics("There are none.", 0, reference_compat=True) == {
    "correct": 0.0, "close": 0.0, "valid": 0.0}
  with pytest.raises(ValueError, match="gt_count"):
    count_metrics("3", -1)
  with pytest.raises(ValueError, match="gt_count"):
    count_metrics("3", 2.5)

# ----------------------------------------------------------------------------- pointing

W, H = 100, 50           # percent x = pixel x, percent y = 2 * pixel y
SIZE = (W, H)


def box(x0, x1, y0, y1):
  mask = np.zeros((H, W), bool)
  mask[y0:y1, x0:x1] = True
  return mask


GT_A, MASK_A = [15, 15], box(10, 20, 10, 20)
GT_B, MASK_B = [80, 40], box(70, 90, 35, 45)


def point(x_px, y_px):
  return f'<point x="{x_px:.1f}" y="{2 * y_px:.1f}" alt="a">a</point>'


def points(*xy):
  attrs = " ".join(f'x{i}="{x:.1f}" y{i}="{2 * y:.1f}"' for i, (x, y) in enumerate(xy, 1))
  return f'<points {attrs} alt="a">a</points>'


def prf(prediction, gt, masks):
  scores = pointing_metrics(prediction, gt, masks, SIZE)
  return scores["precision"], scores["recall"], scores["f1"]


@pytest.mark.parametrize("prediction,expected", [
  ("There are none.", 1.0),
  ("I do not see any.", 1.0),
  (point(5, 5), 0.0),
  ("Click(1.0, 2.0)", 0.0),            # any parsed point counts, format or not
])
def test_pointing_gt_without_points(prediction, expected):
  assert prf(prediction, np.zeros((0, 2)), []) == (expected, expected, expected)


@pytest.mark.parametrize("prediction,expected_pr", [
  (point(15, 15), (1.0, 1.0)),
  (point(25, 15), (0.0, 0.0)),         # outside the mask
  ("Click(15.0, 30.0)", (0.0, 0.0)),   # inside, but not a valid point format
  ("(15.0, 30.0)", (1.0, 1.0)),
  ('<point p=150,300 alt="a">a</point>', (1.0, 1.0)),
  ('<point x="15" y="30" alt="a">a</point>', (1.0, 1.0)),
  ("Sure! " + point(15, 15), (0.0, 0.0)),
  ('<point x="150.0" y="20.0" alt="a">a</point>', (0.0, 0.0)),  # well formed, value > 100
  ("There are none.", (0.0, 0.0)),
  (point(19.5, 15), (0.0, 0.0)),       # rounds (half to even) to x=20: outside
  (point(18.5, 15), (1.0, 1.0)),       # rounds to x=18: inside
  (points((15, 15), (50, 25)), (0.5, 1.0)),
])
def test_pointing_one_object(prediction, expected_pr):
  precision, recall, f1 = prf(prediction, [GT_A], [MASK_A])
  assert (precision, recall) == expected_pr
  assert f1 == pytest.approx(pointing_f1(precision, recall))


@pytest.mark.parametrize("prediction,expected_pr", [
  (point(15, 15), (1.0, 0.5)),
  (points((16, 16), (79, 39)), (1.0, 1.0)),
  (points((79, 39), (16, 16)), (1.0, 1.0)),
  (points((16, 16), (79, 39), (50, 5)), (2 / 3, 1.0)),
  (points((16, 16), (50, 5)), (0.5, 0.5)),
])
def test_pointing_two_objects(prediction, expected_pr):
  precision, recall, _ = prf(prediction, [GT_A, GT_B], [MASK_A, MASK_B])
  assert (precision, recall) == pytest.approx(expected_pr)


def test_pointing_hit_is_tested_against_the_matched_object_mask():
  # The prediction lies in object A's mask, but B's point is nearer, so it is matched to B.
  gt = [[15, 15], [52, 26]]
  masks = [box(45, 55, 20, 30), box(0, 5, 0, 5)]
  assert prf(point(50, 25), gt, masks) == (0.0, 0.0, 0.0)
  assert prf(point(50, 25), [[15, 15]], masks[:1]) == pytest.approx((1.0, 1.0, 1.0))


def test_pointing_point_on_the_image_edge_is_outside():
  assert prf(point(100, 10), [[99, 10]], [np.ones((H, W), bool)]) == (0.0, 0.0, 0.0)


def test_pointing_f1_values():
  assert pointing_f1(1.0, 1.0) == pytest.approx(1.0)
  assert pointing_f1(1.0, 1.0) < 1.0                   # the 1e-10 in the denominator
  assert pointing_f1(0.5, 1.0) == pytest.approx(2 / 3)
  assert pointing_f1(0.0, 1.0) == 0.0


@pytest.mark.parametrize("gt,masks,match", [
  ([GT_A, GT_B], [MASK_A], "one .* mask per GT point"),
  ([GT_A], [np.zeros((2, H, W), bool)], r"masks\[0\]"),
  ([[1, 2, 3]], [MASK_A], r"gt_points_px must have shape \[G, 2\]"),
])
def test_pointing_bad_inputs(gt, masks, match):
  with pytest.raises(ValueError, match=match):
    pointing_metrics(point(15, 15), gt, masks, SIZE)


@pytest.mark.parametrize("xy,inside", [
  ((0.5, 0.0), True),                   # rounds to 0
  ((1.5, 0.0), False),                  # rounds to 2
  ((2.5, 0.0), False),                  # rounds to 2
  ((-0.4, 0.0), True),
  ((-0.6, 0.0), False),                 # -1: off the image
  ((0.0, 3.0), False),                  # below the image
])
def test_is_point_in_mask(xy, inside):
  mask = np.zeros((3, 4), bool)
  mask[:, :2] = True
  assert is_point_in_mask(xy, mask) is inside


# ----------------------------------------------------------------------------- synthetic summary


def test_synthetic_pointing_reports_f1_with_and_without_objects_apart(tmp_path):
  """A model that always says "There are none." scores 1 on the empty scenes and 0 on the rest;
  the split metrics show it, the overall F1 is their example-weighted mean."""
  import types

  from molmo_jax.data.synthetic import SyntheticSource
  from molmo_jax.evals.runner import evaluate

  class NoneSayer:
    max_crops = None

    def predict(self, images, prompts, *, sampling=None, style=None, stop_strings=(), seed=0):
      return [types.SimpleNamespace(text="There are none.", finish_reason="eos") for _ in images]

  source = SyntheticSource(24, seed=5, task="points", split="eval")
  counts = [source[i]["count"] for i in range(len(source))]
  empty = sum(c == 0 for c in counts)
  assert 0 < empty < len(counts)
  metrics = evaluate(NoneSayer(), "synthetic_points", data=source, output_dir=tmp_path, progress=False)
  assert metrics["f1_without_objects"] == 1.0
  assert metrics["f1_with_objects"] == 0.0
  assert metrics["f1"] == pytest.approx(empty / len(counts))
