"""Pictures of a run, drawn with Pillow only: a contact sheet of answers and a learning curve.

contact_sheet(tiles) -> one PNG with a grid of images, each with its drawn points (predicted:
  filled circles, true: crosses, as `preprocess.points.draw_points`) and its question / answer
  underneath.
learning_curve(panels) -> one PNG with one line chart per panel (x = training step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from molmo_jax.preprocess import points as points_lib

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_GRID = (225, 225, 225)
_RIGHT = (30, 130, 50)
_WRONG = (190, 40, 40)
# Line colours for the curves (colour-blind friendly: blue, orange, green, purple).
SERIES_COLOURS = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167))


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:                       # Pillow < 10.1: fixed-size bitmap font
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
  return draw.textlength(text, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels; the last line ends in an ellipsis when text is cut."""
  chars = max(8, int(width / max(_text_width(draw, "x", font), 1)))
  lines = []
  for paragraph in text.splitlines() or [""]:
    lines.extend(textwrap.wrap(paragraph, chars, break_long_words=True) or [""])
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:max(0, chars - 1)] + "…"
  return lines


@dataclasses.dataclass
class Tile:
  """One cell of a contact sheet.

  image: uint8 [H, W, 3]; predicted / truth: [K, 2] (x, y) pixels; correct: None (not scored),
  True or False (colours the verdict line); verdict: short text such as "F1 0.67" or "count 2 / 3".
  """

  image: np.ndarray
  question: str
  answer: str
  predicted: np.ndarray
  truth: np.ndarray
  verdict: str = ""
  correct: bool | None = None


def contact_sheet(tiles: Sequence[Tile], path: str | os.PathLike, columns: int = 4, cell: int = 200,
                  title: str = "") -> Image.Image:
  """Grid of `tiles` (images scaled to fit `cell` px) with their text; saved as PNG at `path`."""
  if not tiles:
    raise ValueError("contact_sheet: no tiles to draw")
  font, small = _font(12), _font(11)
  pad, text_lines, line_h = 8, 5, 14
  text_h = text_lines * line_h + 4
  rows = math.ceil(len(tiles) / columns)
  title_h = 28 if title else 0
  width = columns * (cell + pad) + pad
  height = title_h + rows * (cell + text_h + 2 * pad) + pad
  sheet = Image.new("RGB", (width, height), _BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((pad, 7), title, fill=_TEXT, font=_font(14))
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    x0 = pad + c * (cell + pad)
    y0 = title_h + pad + r * (cell + text_h + 2 * pad)
    h, w = tile.image.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = Image.fromarray(np.asarray(tile.image, np.uint8)).resize(size, Image.NEAREST)
    scaled = lambda p: np.asarray(p, np.float32).reshape(-1, 2) * scale
    picture = points_lib.draw_points(picture, scaled(tile.predicted), scaled(tile.truth))
    sheet.paste(picture, (x0 + (cell - size[0]) // 2, y0 + (cell - size[1]) // 2))
    ty = y0 + cell + 3
    lines = [("Q: " + line, _TEXT) for line in _wrap(draw, tile.question, small, cell, 1)]
    lines += [(("A: " if j == 0 else "   ") + line, _MUTED)
              for j, line in enumerate(_wrap(draw, tile.answer, small, cell - 12, text_lines - 2))]
    for line, colour in lines:
      draw.text((x0, ty), line, fill=colour, font=small)
      ty += line_h
    if tile.verdict:
      colour = _TEXT if tile.correct is None else (_RIGHT if tile.correct else _WRONG)
      draw.text((x0, y0 + cell + 3 + (text_lines - 1) * line_h), tile.verdict, fill=colour, font=font)
  sheet.save(os.fspath(path), format="PNG", optimize=True)
  return sheet


@dataclasses.dataclass
class Panel:
  """One chart: `series` maps a legend label to ([steps], [values]); y from y_range (None: data)."""

  title: str
  series: dict[str, tuple[Sequence[float], Sequence[float]]]
  y_range: tuple[float, float] | None = None
  y_label: str = ""


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  span = max(hi - lo, 1e-12)
  raw = span / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
  first = math.ceil(lo / step) * step
  return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int]) -> None:
  x0, y0, x1, y1 = box
  font, small = _font(13), _font(11)
  draw.text((x0, y0), panel.title, fill=_TEXT, font=font)
  left, top, right, bottom = x0 + 44, y0 + 24, x1 - 8, y1 - 56
  values = [v for _, ys in panel.series.values() for v in ys if v is not None and math.isfinite(v)]
  steps = [s for xs, _ in panel.series.values() for s in xs]
  if not values or not steps:
    draw.text((left, top), "no data", fill=_MUTED, font=small)
    return
  lo, hi = panel.y_range or (min(values), max(values))
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  smin, smax = min(0.0, min(steps)), max(steps)
  smax = smax if smax > smin else smin + 1
  sx = lambda s: left + (s - smin) / (smax - smin) * (right - left)
  sy = lambda v: bottom - (min(max(v, lo), hi) - lo) / (hi - lo) * (bottom - top)
  for tick in _nice_ticks(lo, hi):
    draw.line([(left, sy(tick)), (right, sy(tick))], fill=_GRID)
    label = f"{tick:g}"
    draw.text((left - 6 - _text_width(draw, label, small), sy(tick) - 6), label, fill=_MUTED, font=small)
  for tick in _nice_ticks(smin, smax):
    draw.line([(sx(tick), bottom), (sx(tick), bottom + 3)], fill=_MUTED)
    label = f"{tick:g}"
    draw.text((sx(tick) - _text_width(draw, label, small) / 2, bottom + 5), label, fill=_MUTED, font=small)
  draw.rectangle([left, top, right, bottom], outline=_MUTED)
  draw.text(((left + right) / 2 - 14, bottom + 19), "step", fill=_MUTED, font=small)
  lx = left
  for k, (name, (xs, ys)) in enumerate(panel.series.items()):
    colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
    pts = [(sx(s), sy(v)) for s, v in zip(xs, ys) if v is not None and math.isfinite(v)]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    if len(pts) <= 40:                    # sparse series (evaluations): mark each point
      for px, py in pts:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    draw.line([(lx, y1 - 8), (lx + 16, y1 - 8)], fill=colour, width=3)
    draw.text((lx + 20, y1 - 15), name, fill=_TEXT, font=small)
    lx += 28 + _text_width(draw, name, small)


def learning_curve(panels: Sequence[Panel], path: str | os.PathLike, title: str = "",
                   panel_size: tuple[int, int] = (420, 300)) -> Image.Image:
  """Side-by-side line charts; saved as PNG at `path`."""
  if not panels:
    raise ValueError("learning_curve: no panels to draw")
  pw, ph = panel_size
  title_h = 26 if title else 0
  image = Image.new("RGB", (len(panels) * pw + 16, ph + title_h + 8), _BACKGROUND)
  draw = ImageDraw.Draw(image)
  if title:
    draw.text((8, 6), title, fill=_TEXT, font=_font(14))
  for k, panel in enumerate(panels):
    _draw_panel(draw, panel, (8 + k * pw, title_h + 4, 8 + (k + 1) * pw - 12, title_h + ph))
  image.save(os.fspath(path), format="PNG", optimize=True)
  return image
