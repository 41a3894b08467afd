"""Tests for molmo_jax.preprocess.points: format / parse / validate / draw (the reference's olmo/data/data_formatter.py (point and count answers))."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_jax.preprocess.points import (draw_points, format_count_answer, format_points,
                                         is_valid_point_format, parse_points, percent_to_pixels,
                                         points_to_percent)

# ----------------------------------------------------------------------------- formatting


def test_format_single_point_is_percent_of_original_size():
  # (50, 120) in a 200x300 image = (25 %, 40 %).
  assert format_points([[50, 120]], (200, 300), "dog") == (
    '<point x="25.0" y="40.0" alt="dog">dog</point>')


def test_format_several_points_sorted_by_x_then_y_with_alt():
  text = format_points([[30, 10], [10, 20], [10, 5]], (100, 100), "cats", alt="a cat")
  assert text == ('<points x1="10.0" y1="5.0" x2="10.0" y2="20.0" x3="30.0" y3="10.0" '
                  'alt="a cat">cats</points>')


def test_format_rounds_to_one_decimal_like_numpy():
  # 414.5 / 10 = 41.45: numpy rounding (the reference's) gives 41.4, Python's round() 41.5.
  assert format_points([[414.5, 37.0]], (1000, 1210), "x") == (
    '<point x="41.4" y="3.1" alt="x">x</point>')


def test_format_sort_key_uses_rounded_values():
  # 10.04 and 9.96 both round to 10.0, so y decides the order.
  text = format_points([[10.04, 50], [9.96, 20]], (100, 100), "p")
  assert text.startswith('<points x1="10.0" y1="20.0" x2="10.0" y2="50.0"')


def test_format_zero_points_raises():
  with pytest.raises(ValueError, match="points_px is empty"):
    format_points(np.zeros((0, 2)), (10, 10), "dog")


@pytest.mark.parametrize("points,size,match", [
  ([[1, 2, 3]], (10, 10), r"shape \[K, 2\]"),
  ([[np.nan, 1]], (10, 10), "finite"),
  ([[1, 2]], (0, 10), "positive"),
  ([[1, 2]], (10,), r"\(width, height\)"),
])
def test_format_bad_input_raises(points, size, match):
  with pytest.raises(ValueError, match=match):
    format_points(points, size, "x")


def test_count_answer_forms():
  assert format_count_answer([], (10, 10), "dogs") == "There are none."
  assert format_count_answer([[5, 5]], (10, 10), "dogs") == (
    'Counting the <point x="50.0" y="50.0" alt="dogs">dogs</point> shows a total of 1.')
  assert format_count_answer([[5, 5], [1, 1]], (10, 10), "dogs") == (
    'Counting the <points x1="10.0" y1="10.0" x2="50.0" y2="50.0" alt="dogs">dogs</points> '
    'shows a total of 2.')


def test_percent_pixel_conversions_are_inverse():
  px = np.array([[10.0, 30.0], [0.0, 299.0]])
  pct = points_to_percent(px, (200, 300))
  np.testing.assert_allclose(pct, [[5.0, 10.0], [0.0, 99.6666666]], rtol=1e-6)
  np.testing.assert_allclose(percent_to_pixels(pct, (200, 300)), px)

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,expected_percent", [
  ("Click(12.3, 45.6)", [[12.3, 45.6]]),
  ("Click(12.3,45.6)", [[12.3, 45.6]]),
  ("(12.3, 45.6)", [[12.3, 45.6]]),
  ("(12.3,45.6) (1.0 2.0)", [[12.3, 45.6], [1.0, 2.0]]),
  ('<point x="12.5" y="30" alt="a">a</point>', [[12.5, 30.0]]),
  ('<point x=" 12.5" y="  7.25" alt="a">a</point>', [[12.5, 7.25]]),
  ('<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="a">a</points>', [[1, 2], [3, 4]]),
  ('x10="99.9" y10="100"', [[99.9, 100.0]]),
  ('<point p=123,456 alt="a">a</point>', [[12.3, 45.6]]),
  ('<points 1=100,200 2= 300 , 400 alt="a">a</points>', [[10, 20], [30, 40]]),
  # Grouped by form (click, paren, attribute, legacy), each in text order.
  ('p=500,500 then x="1.0" y="2.0" then (3.0, 4.0)', [[3, 4], [1, 2], [50, 50]]),
])
def test_parse_every_form(text, expected_percent):
  np.testing.assert_allclose(parse_points(text), expected_percent)


@pytest.mark.parametrize("text", [
  "",
  "There are none.",
  "(12, 34)",                                   # pattern 2 needs one decimal
  "(12.34, 5.6)",
  "Click(1.25, 3.5)",
  '<point x="abc" y="1.0" alt="a">a</point>',
  '<point x="12.5" alt="a">a</point>',          # no y
  "p=12,34",                                    # legacy needs three digits
  '<point x="100.1" y="5.0" alt="a">a</point>',  # above 100: dropped
  "(150.0, 20.0)",
])
def test_parse_malformed_gives_no_points(text):
  points = parse_points(text, (640, 480))
  assert points.shape == (0, 2) and points.dtype == np.float64


def test_parse_drops_only_the_pair_above_100():
  text = '<points x1="10.0" y1="20.0" x2="101.0" y2="5.0" x3="100.0" y3="100.0" alt="a">a</points>'
  np.testing.assert_allclose(parse_points(text), [[10, 20], [100, 100]])


def test_parse_maps_to_pixels_with_original_size():
  points = parse_points('<point x="25.0" y="50.0" alt="a">a</point>', image_size=(640, 480))
  np.testing.assert_allclose(points, [[160.0, 240.0]])


def test_parse_click_is_counted_once_unless_reference_compat():
  text = "Click(12.3, 45.6) Click(1.0, 2.0)"
  np.testing.assert_allclose(parse_points(text), [[12.3, 45.6], [1.0, 2.0]])
  np.testing.assert_allclose(parse_points(text, reference_compat=True),
                             [[12.3, 45.6], [1.0, 2.0], [12.3, 45.6], [1.0, 2.0]])
  # A free-standing pair next to a click is not a duplicate.
  np.testing.assert_allclose(parse_points("Click(1.0, 2.0) (3.0, 4.0)"), [[1, 2], [3, 4]])


def test_parse_rejects_non_string():
  with pytest.raises(TypeError, match="text must be a str"):
    parse_points(b"(1.0, 2.0)")


@settings(max_examples=150, deadline=None)
@given(
  size=st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
  unit=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12),
)
def test_format_parse_round_trip_within_rounding(size, unit):
  w, h = size
  points = np.array(unit) * np.array([w, h])
  parsed = parse_points(format_points(points, size, "thing"), size)
  assert parsed.shape == points.shape
  # One decimal of a percent: at most 0.05 % of the side (plus float slack).
  tolerance = 0.0005 * np.array([w, h]) * (1 + 1e-9) + 1e-9
  for point in points:
    assert np.any(np.all(np.abs(parsed - point) <= tolerance, axis=1)), (point, parsed)
  for point in parsed:
    assert np.any(np.all(np.abs(points - point) <= tolerance, axis=1)), (point, points)

# ----------------------------------------------------------------------------- validity


@pytest.mark.parametrize("text", [
  '<point x="12.3" y="45.6" alt="dog">dog</point>',
  '  <point x="12" y="45" alt="">a dog</point>\n',
  '<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="dogs">dogs</points>',
  "(12.3, 45.6)",
  "(12, -4)\n(1.5,2.5)",
  '<point p=123,456 alt="a">a</point>',
  '<points 1=123,456 2=100,200 alt="a">a</points>',
  '<point x="1.0" y="2.0" alt="a">a</point> <point x="3.0" y="4.0" alt="b">b</point>',
])
def test_valid_point_formats(text):
  assert is_valid_point_format(text)


@pytest.mark.parametrize("text", [
  "",
  "There are none.",
  "Click(12.3, 45.6)",
  'Sure! <point x="12.3" y="45.6" alt="dog">dog</point>',
  '<point x="12.3" y="45.6">dog</point>',
  '<point x="12.3" y="45.6" alt="dog">dog',
  '<points alt="dogs">dogs</points>',
  '<point x="-1.0" y="45.6" alt="dog">dog</point>',
  "(12.3, 45.6) and (1.0, 2.0)",
])
def test_invalid_point_formats(text):
  assert not is_valid_point_format(text)

# ----------------------------------------------------------------------------- drawing


def test_draw_points_writes_png_with_marks(tmp_path):
  image = np.full((120, 160, 3), 50, np.uint8)
  out = tmp_path / "points.png"
  drawn = draw_points(image, [[40, 30]], gt_points_px=[[120, 90]], out_path=out)
  assert out.exists()
  saved = np.asarray(Image.open(out).convert("RGB"))
  assert saved.shape == (120, 160, 3)
  np.testing.assert_array_equal(saved, np.asarray(drawn))
  assert not np.array_equal(saved[30, 40], image[30, 40])    # predicted point
  assert not np.array_equal(saved[90, 120], image[90, 120])  # GT cross centre
  assert not np.array_equal(saved[30, 40], saved[90, 120])   # different colours
  np.testing.assert_array_equal(saved[5, 5], image[5, 5])    # far away: untouched
  assert np.all(image == 50)                                 # input not modified


def test_draw_points_accepts_pil_and_grayscale():
  gray = np.zeros((20, 30), np.uint8)
  drawn = draw_points(gray, [[10, 10]])
  assert drawn.mode == "RGB" and drawn.size == (30, 20)
  assert np.asarray(drawn)[10, 10].any()
  pil = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
  assert np.asarray(draw_points(pil, np.zeros((0, 2)), [[5, 5]]))[5, 5].any()


def test_draw_points_rejects_float_images():
  with pytest.raises(ValueError, match="uint8"):
    draw_points(np.zeros((4, 4, 3), np.float32), [[1, 1]])
