"""Pointing and counting text format: write, parse, validate and draw points (the reference's olmo/data/data_formatter.py (point and count answers); olmo/data/data_formatter.py (points)).

The models answer pointing questions with XML-like tags whose coordinates are PERCENT (0-100, one
decimal) of the ORIGINAL image width/height (after EXIF orientation), never of the letterboxed
canvas the network saw:

  one point   <point x="12.3" y="45.6" alt="{alt}">{label}</point>
  several     <points x1="…" y1="…" x2="…" y2="…" alt="{alt}">{label}</points>
  counting    Counting the <points …>{label}</points> shows a total of N.   /   There are none.

Legend: K = number of points; a point array is [K, 2] float in (x, y) order; image_size = (w, h).

Parsing accepts every form the reference parser (`olmo/util.py: extract_points`) accepts:
  1. `Click(x.x, y.y)`                  one decimal each
  2. `(x.x, y.y)`                       one decimal each, comma and space optional
  3. `x{k}="…" y{k}="…"`                 attribute pairs, k optional, integer or decimal values
  4. `p=XXX,YYY` / `{k}=XXX,YYY`        legacy three-digit tenths of a percent
Pairs with a value above 100 are dropped. Points come out grouped by form (1, 2, 3, 4), each form
in text order, as the reference returns them.

Double counting of `Click(...)`: the reference applies the four patterns independently, so pattern
2 also matches the `(x.x, y.y)` tail of every `Click(x.x, y.y)` and each click is returned twice.
We drop that duplicate by default (`reference_compat=False`) because reference metrics do not
depend on it: the pointing metric scores a `Click(...)` answer 0 as an invalid format before any
matching (a click could only slip through inside a tag's label text), and counting reads the
number from the text. Duplicates would only corrupt drawings and point counts. Pass
`reference_compat=True` to get the reference's list exactly.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageDraw

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"

# The four forms the reference parser collects, in the order it collects them.
_CLICK_RE = re.compile(r"Click\(([0-9]+\.[0-9]), ?([0-9]+\.[0-9])\)")
_PAREN_RE = re.compile(r"\(([0-9]+\.[0-9]),? ?([0-9]+\.[0-9])\)")
_ATTRIBUTE_RE = re.compile(rf'x[0-9]*="\s*({_NUMBER})"\s+y[0-9]*="\s*({_NUMBER})"')
_LEGACY_RE = re.compile(r"(?:[0-9]+|p)\s*=\s*([0-9]{3})\s*,\s*([0-9]{3})")

# What the pointing metric accepts as a well-formed answer (reference `is_valid_format`). The text
# between the opening tag and the final closing tag is free, so several tags in a row also pass.
_SIGNED = r"-?[0-9]+(?:\.[0-9]+)?"
_QUOTED = r'"\s*[0-9]+(?:\.[0-9]+)?"'
_TAIL = r'alt="[\s\S]*?">[\s\S]*?'
_VALID_FORMAT_RE = re.compile(
  "|".join([
    rf"(?:\(\s*{_SIGNED}\s*,\s*{_SIGNED}\s*\)\n?)+",
    rf"<point\s+x={_QUOTED}\s+y={_QUOTED}\s+{_TAIL}</point>",
    rf"<points\s+(?:x[0-9]+={_QUOTED}\s+y[0-9]+={_QUOTED}\s+)+{_TAIL}</points>",
    rf"<point\s+p=\s*[0-9]{{3}}\s*,\s*[0-9]{{3}}\s+{_TAIL}</point>",
    rf"<points\s+(?:[0-9]+=\s*[0-9]{{3}}\s*,\s*[0-9]{{3}}\s+)+{_TAIL}</points>",
  ]))

# Drawing colours: predictions red with a white rim, ground truth green crosses.
_PRED_FILL = (255, 40, 40)
_PRED_OUTLINE = (255, 255, 255)
_GT_COLOUR = (0, 220, 0)


def _check_image_size(image_size, name: str = "image_size") -> tuple[float, float]:
  if image_size is None or len(image_size) != 2:
    raise ValueError(f"{name} must be (width, height), got {image_size!r}")
  w, h = float(image_size[0]), float(image_size[1])
  if not (w > 0 and h > 0):
    raise ValueError(f"{name} must be positive (width, height), got {image_size!r}")
  return w, h


def _as_point_array(points, name: str) -> np.ndarray:
  arr = np.asarray(points, dtype=np.float64)
  if arr.size == 0:
    return np.zeros((0, 2), np.float64)
  if arr.ndim != 2 or arr.shape[1] != 2:
    raise ValueError(f"{name} must have shape [K, 2] in (x, y) order, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {arr.tolist()}")
  return arr


def points_to_percent(points_px, image_size) -> np.ndarray:
  """[K, 2] pixels -> [K, 2] percent of (w, h); divides by (w/100, h/100) as the reference does."""
  w, h = _check_image_size(image_size)
  return _as_point_array(points_px, "points_px") / np.array([w / 100.0, h / 100.0])


def percent_to_pixels(points_pct, image_size) -> np.ndarray:
  """[K, 2] percent of (w, h) -> [K, 2] pixels (`x/100 * w`, as the reference parser)."""
  w, h = _check_image_size(image_size)
  return _as_point_array(points_pct, "points_pct") / 100.0 * np.array([w, h])


def _rounded_sorted_percent(points_px, image_size) -> list[tuple[float, float]]:
  # numpy rounding (scale by 10, round half to even), not Python's round(): the reference rounds
  # numpy scalars, and e.g. 41.45 becomes 41.4 there but 41.5 with round().
  rounded = np.round(points_to_percent(points_px, image_size), 1)
  points = [(float(x), float(y)) for x, y in rounded]
  points.sort(key=lambda p: p[0] * 10000 + p[1])
  return points


def format_points(points_px, image_size, label: str, alt: str | None = None) -> str:
  """Writes points as the model's `<point>` / `<points>` tag.

  Args:
    points_px: [K, 2] (x, y) pixel coordinates in the ORIGINAL image, K >= 1.
    image_size: (w, h) of the original image.
    label: text between the tags (the reference lower-cases dataset labels before calling).
    alt: the `alt` attribute; defaults to `label`.
  """
  points = _rounded_sorted_percent(points_px, image_size)
  if not points:
    raise ValueError("points_px is empty: zero points have no tag form, use format_count_answer")
  alt = label if alt is None else alt
  if len(points) == 1:
    x, y = points[0]
    return f'<point x="{x:0.1f}" y="{y:0.1f}" alt="{alt}">{label}</point>'
  attributes = " ".join(
    f'x{i}="{x:0.1f}" y{i}="{y:0.1f}"' for i, (x, y) in enumerate(points, start=1))
  return f'<points {attributes} alt="{alt}">{label}</points>'


def format_count_answer(points_px, image_size, label: str) -> str:
  """The `point_count` answer: points then the total, or "There are none." for zero points."""
  count = _as_point_array(points_px, "points_px").shape[0]
  if count == 0:
    return "There are none."
  tag = format_points(points_px, image_size, label)
  return f"Counting the {tag} shows a total of {count}."


def _matched_pairs(pattern: re.Pattern, text: str, scale: float,
                   skip_ends: frozenset[int] = frozenset()):
  pairs, ends = [], []
  for match in pattern.finditer(text):
    if match.end() in skip_ends:
      continue
    pairs.append((float(match.group(1)) / scale, float(match.group(2)) / scale))
    ends.append(match.end())
  return pairs, ends


def parse_points(text: str, image_size=None, reference_compat: bool = False) -> np.ndarray:
  """Every point written in `text` (see the module docstring for the accepted forms).

  Args:
    text: model output.
    image_size: (w, h) of the ORIGINAL image; None returns percent units (0-100).
    reference_compat: keep the reference's second copy of each `Click(x, y)` point.

  Returns:
    [K, 2] float64 (x, y), in pixels when image_size is given; K may be 0.
  """
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}")
  clicks, click_ends = _matched_pairs(_CLICK_RE, text, 1.0)
  # A pattern-2 match ending where a click ends is that click's own "(x, y)" tail.
  skip = frozenset() if reference_compat else frozenset(click_ends)
  parens, _ = _matched_pairs(_PAREN_RE, text, 1.0, skip)
  attributes, _ = _matched_pairs(_ATTRIBUTE_RE, text, 1.0)
  legacy, _ = _matched_pairs(_LEGACY_RE, text, 10.0)
  kept = [p for p in clicks + parens + attributes + legacy if max(p) <= 100]
  percent = np.array(kept, np.float64).reshape(-1, 2)
  if image_size is None:
    return percent
  return percent_to_pixels(percent, image_size)


def is_valid_point_format(text: str) -> bool:
  """Whether the whole stripped answer is a point list or point tag(s) (`is_valid_format`).

  The pointing metric scores an answer 0 when this is False, whatever points it contains.
  """
  return _VALID_FORMAT_RE.fullmatch(text.strip()) is not None


def _to_rgb_image(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise ValueError(f"image array must be uint8 HWC or HW, got dtype {arr.dtype}")
  if arr.ndim == 2:
    arr = np.repeat(arr[:, :, None], 3, axis=2)
  if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
    raise ValueError(f"image array must be [H, W], [H, W, 1|3|4], got shape {arr.shape}")
  if arr.shape[2] == 1:
    arr = np.repeat(arr, 3, axis=2)
  return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


def draw_points(image, pred_points_px, gt_points_px=None, out_path: str | os.PathLike | None = None
                ) -> Image.Image:
  """Draws predictions as filled circles with a rim and ground truth as crosses.

  Args:
    image: uint8 [H, W, C] / [H, W] array or a PIL image (not modified; a copy is drawn on).
    pred_points_px: [K, 2] predicted (x, y) pixels.
    gt_points_px: optional [G, 2] ground-truth (x, y) pixels.
    out_path: when given, the drawing is also saved there as PNG.
  """
  canvas = _to_rgb_image(image).copy()
  draw = ImageDraw.Draw(canvas)
  w, h = canvas.size
  # Marks stay visible on thumbnails and do not swamp large photos.
  radius = max(2, round(0.012 * min(w, h)))
  rim = max(1, radius // 3)
  for x, y in _as_point_array(gt_points_px if gt_points_px is not None else [], "gt_points_px"):
    draw.line([(x - radius, y - radius), (x + radius, y + radius)], fill=_GT_COLOUR, width=rim)
    draw.line([(x - radius, y + radius), (x + radius, y - radius)], fill=_GT_COLOUR, width=rim)
  for x, y in _as_point_array(pred_points_px, "pred_points_px"):
    box = [x - radius, y - radius, x + radius, y + radius]
    draw.ellipse(box, fill=_PRED_FILL, outline=_PRED_OUTLINE, width=rim)
  if out_path is not None:
    canvas.save(os.fspath(out_path), format="PNG")
  return canvas


__all__ = (
  "draw_points", "format_count_answer", "format_points", "is_valid_point_format", "parse_points",
  "percent_to_pixels", "points_to_percent")
