"""AI2D from the official release (ai2d-all.zip): questions/, images/, annotations/ + test ids.

The reference evaluates AI2D as its "mix" test split (the reference's olmo/eval/evaluators.py (metrics)): every question once on the plain
image, and questions about abc-labelled diagrams ("abcLabel") a second time. For those the text
boxes of the diagram are covered by letter boxes, drawn two ways:

  opaque       filled box with the letter written inside it          question_id
  transparent  half-transparent box, letter on white at its top-left  question_id + "_transparent"

`mc_ai2d_opaque` / `mc_ai2d_transparent` count abc questions only in their own variant (the paper
reports the transparent one). Options "{}" (empty slots) and duplicate options are dropped, as the
reference does. DEVIATION: the reference draws with Arial; we use Arial or DejaVuSans when the
system has them, else Pillow's built-in font, so letter glyphs may differ slightly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont

from molmo_jax.evals.readers import DataError, Skip, Table, load_json

TEST_IDS_FILE = "ai2d_test_ids.csv"
BOX_COLOUR = (25, 249, 255)
_FONT_NAMES = ("Arial.ttf", "arial.ttf", "DejaVuSans.ttf")


def find_ai2d_root(path: Path) -> Path | None:
  for candidate in (path, path / "ai2d"):
    if (candidate / "questions").is_dir() and (candidate / "images").is_dir():
      return candidate
  return None


def _font(size: int) -> ImageFont.ImageFont:
  for name in _FONT_NAMES:
    try:
      return ImageFont.truetype(name, size)
    except OSError:
      continue
  return ImageFont.load_default(size=size)


def _font_size(image_size: tuple[int, int]) -> int:
  # The reference scales with the SHORT side despite naming it the longest.
  return min(max(16, int(min(image_size) / 50)), 32)


def draw_letter_boxes(image: Image.Image, annotations: dict, transparent: bool) -> Image.Image:
  """The diagram with every annotated text box replaced by its letter (module docstring)."""
  # An RGBA draw context on an RGB image blends the half-transparent fill, as the reference.
  image = image.convert("RGB")
  draw = ImageDraw.Draw(image, "RGBA" if transparent else "RGB")
  fill = BOX_COLOUR + ((127,) if transparent else ())
  for box in annotations.get("text", {}).values():
    (x1, y1), (x2, y2) = box["rectangle"]
    if y1 == y2:
      continue  # degenerate box, also skipped by the reference
    letter = box["replacementText"]
    draw.rectangle([x1, y1, x2, y2], fill=fill)
    if transparent:
      font = _font(_font_size(image.size))
      corner = (max(x1 - 12, 0), max(y1 - 10, 0))
      draw.rectangle(draw.textbbox(corner, letter, font=font), fill="white")
      draw.text(corner, letter, fill="black", font=font)
    else:
      height, size = y2 - y1, 22
      font = _font(size)
      bbox = draw.textbbox((100, 100), letter, font=font)
      while height > 4 and bbox[3] - bbox[1] > height and size > 1:
        size -= 1
        font = _font(size)
        bbox = draw.textbbox((100, 100), letter, font=font)
      half_width = (bbox[2] - bbox[0]) / 2
      spare = height - (bbox[3] - bbox[1])
      draw.text(((x1 + x2) / 2 - half_width, y1 - (bbox[1] - 100) + spare / 2), letter,
                fill="black", font=font)
  return image


def _png_bytes(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def _test_image_ids(root: Path) -> set[int]:
  for candidate in (root / TEST_IDS_FILE, root.parent / TEST_IDS_FILE):
    if candidate.is_file():
      with open(candidate) as f:
        return {int(row[0]) for row in csv.reader(f) if row and row[0].strip()}
  raise DataError(f"{root}: the official AI2D layout needs {TEST_IDS_FILE} (the test split's "
                  f"image ids) in {root} or its parent; see docs/evaluation.md")


def _pruned_options(options: list[str], correct: int) -> tuple[list[str], int]:
  answer = options[correct]
  pruned: list[str] = []
  for option in options:
    if option != "{}" and option not in pruned:
      pruned.append(option)
  return pruned, pruned.index(answer)


def _questions_of(question_file: Path, root: Path) -> Iterator[dict | Skip]:
  """Reference-format rows (answer_texts, correct_answer, abc_label, ...) of one diagram."""
  content = load_json(question_file)
  image_name = content["imageName"]
  image_path = root / "images" / image_name
  questions = content.get("questions", {})
  needs_letters = any(q.get("abcLabel") for q in questions.values())
  drawn: dict[bool, bytes] = {}
  letters: set[str] = set()
  if needs_letters:
    annotation_file = root / "annotations" / f"{image_name}.json"
    if not annotation_file.is_file() or not image_path.is_file():
      missing = annotation_file if not annotation_file.is_file() else image_path
      for q in questions.values():
        if q.get("abcLabel"):
          yield Skip(q["questionId"], f"missing image or annotation {missing.name}")
      questions = {k: q for k, q in questions.items() if not q.get("abcLabel")}
    else:
      annotations = load_json(annotation_file)
      letters = {box["replacementText"].upper() for box in annotations.get("text", {}).values()}
      with Image.open(image_path) as plain:
        drawn = {t: _png_bytes(draw_letter_boxes(plain, annotations, t)) for t in (False, True)}
  for text, q in questions.items():
    options, correct = _pruned_options(q["answerTexts"], q["correctAnswer"])
    row = {"question": text, "answer_texts": options, "correct_answer": correct,
           "abc_label": bool(q.get("abcLabel")), "image_name": image_name,
           "option_is_abc": [o.upper() in letters for o in options]}
    if not row["abc_label"]:
      yield dict(row, question_id=q["questionId"], image=str(image_path), has_transparent_box=False)
      continue
    yield dict(row, question_id=q["questionId"], image=drawn[False], has_transparent_box=False)
    yield dict(row, question_id=q["questionId"] + "_transparent", image=drawn[True],
               has_transparent_box=True)


def read_ai2d_official(path: Path) -> Table | None:
  """The reference's AI2D test "mix" from the official files; None if `path` is not that layout."""
  root = find_ai2d_root(path) if path.is_dir() else None
  if root is None:
    return None
  test_ids = _test_image_ids(root)
  files = sorted(f for f in (root / "questions").glob("*.json")
                 if f.name.split(".")[0].isdigit() and int(f.name.split(".")[0]) in test_ids)
  if not files:
    raise DataError(f"{root}/questions holds no question file of the {len(test_ids)} test images "
                    f"listed in {TEST_IDS_FILE}")

  def rows():
    for question_file in files:
      yield from _questions_of(question_file, root)

  return Table(rows(), (root / "images", root), f"{root} (official AI2D, test mix)")
