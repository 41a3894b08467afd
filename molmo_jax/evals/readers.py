"""Benchmark data as users keep it on disk: raw rows, images, and the official file layouts.

A reader turns a `--data PATH` into a `Table`: an iterator of raw row dicts (or `Skip`s for rows
that cannot be read) plus the folders relative image paths start from. What a row means is the
task's business (molmo_jax/evals/tasks.py); this module only knows storage:

  *.jsonl                  one JSON object per line (an unreadable line becomes a Skip)
  *.json                   a list of rows, or {"data": [...]} (DocVQA, InfoVQA, TextVQA official)
  *.parquet / *.arrow      Hugging Face files; a `save_to_disk` folder; a folder of parquet shards
                           (needs pyarrow, an optional dependency)
  official layouts         VQA v2 questions + annotations JSON, ChartQA {split}_human/augmented
                           JSON + png/, AI2D questions/ + images/ + annotations/ (readers_ai2d.py)

Images stay encoded (bytes or a path) until the runner loads them, so a bad image costs one
example, never the run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from molmo_jax.data.sources import hf_data_files

# Split folders/files tried, in order, when a path holds several (the paper's reporting splits).
DEFAULT_SPLITS = ("test", "validation", "val", "testmini")
_ARROW_BATCH_ROWS = 64


class DataError(ValueError):
  """The data path as a whole cannot be used; the message names the path and what was expected."""


class BadRow(ValueError):
  """One row cannot be used (missing image, missing field); the example is skipped and counted."""


@dataclasses.dataclass(frozen=True)
class Skip:
  """An example that was not evaluated and why (reported in the metrics file)."""

  id: str
  reason: str


@dataclasses.dataclass
class Table:
  """Raw rows of one dataset. `rows` yields dicts (or Skips); `image_dirs` resolve relative paths."""

  rows: Iterable[dict | Skip]
  image_dirs: tuple[Path, ...]
  description: str
  num_rows: int | None = None


# --------------------------------------------------------------------------------------------
# Generic rows
# --------------------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[dict | Skip]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        yield Skip(f"line{line_number}", f"unreadable row: {path.name} line {line_number}: {e}")
        continue
      if not isinstance(row, dict):
        yield Skip(f"line{line_number}", f"unreadable row: {path.name} line {line_number} is a "
                                         f"{type(row).__name__}, expected a JSON object")
        continue
      yield row


def _count_lines(path: Path) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def load_json(path: Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None


def json_rows(path: Path) -> list[dict]:
  """Rows of a JSON file: a list, or the "data" list of the DocVQA/InfoVQA/TextVQA files."""
  content = load_json(path)
  if isinstance(content, dict) and isinstance(content.get("data"), list):
    content = content["data"]
  if not isinstance(content, list):
    keys = list(content)[:8] if isinstance(content, dict) else type(content).__name__
    raise DataError(f"{path}: expected a JSON list of rows or an object with a 'data' list, "
                    f"got {keys}")
  return content


def _pyarrow():
  try:
    import pyarrow
    import pyarrow.parquet  # noqa: F401 - registers pyarrow.parquet
  except ImportError:
    raise DataError("reading parquet/arrow data needs pyarrow, which is not installed: "
                    "`pip install pyarrow`, or export the rows to JSONL") from None
  return pyarrow


def _arrow_rows(fmt: str, files: Sequence[str]) -> Iterator[dict]:
  pa = _pyarrow()
  for name in files:
    if fmt == "parquet":
      batches = pa.parquet.ParquetFile(name).iter_batches(batch_size=_ARROW_BATCH_ROWS)
    else:
      batches = pa.ipc.open_stream(pa.memory_map(name, "r"))
    for batch in batches:
      yield from batch.to_pylist()


def _arrow_num_rows(fmt: str, files: Sequence[str]) -> int | None:
  pa = _pyarrow()
  if fmt == "parquet":
    return sum(pa.parquet.ParquetFile(name).metadata.num_rows for name in files)
  return None


def _split_folder(path: Path, splits: Sequence[str]) -> Path | None:
  """The first split named in `splits` that `path` holds as a DatasetDict split or a subfolder."""
  dict_file = path / "dataset_dict.json"
  available = load_json(dict_file).get("splits", []) if dict_file.is_file() else None
  for split in splits:
    if (available is None or split in available) and (path / split).is_dir():
      return path / split
  if available is not None:
    raise DataError(f"{path} is a DatasetDict with splits {available}; none of {list(splits)}. "
                    f"Point --data at the split folder to use, e.g. {path / available[0]}")
  return None


def _split_files(path: Path, splits: Sequence[str]) -> list[str]:
  """Parquet shards of the first split found by name (HF hub layout data/{split}-0000-of-0001)."""
  shards = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True))
  if not shards:
    return []
  for split in splits:
    chosen = [s for s in shards if Path(s).name.startswith(split + "-")
              or Path(s).name.startswith(split + ".") or Path(s).parent.name == split]
    if chosen:
      return chosen
  if len(shards) == 1:
    return shards
  raise DataError(f"{path} holds {len(shards)} parquet files and none is named after a split in "
                  f"{list(splits)}: {[Path(s).name for s in shards[:6]]}; point --data at one file")


_HF_METADATA_FILES = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


def _pick_by_split(files: Sequence[Path], splits: Sequence[str]) -> Path | None:
  """The only file, or the one whose name has the first split of `splits` as a word."""
  if len(files) <= 1:
    return files[0] if files else None
  for split in splits:
    chosen = [f for f in files if re.search(rf"(^|[_.\-]){re.escape(split)}([_.\-]|$)", f.name)]
    if len(chosen) == 1:
      return chosen[0]
  raise DataError(f"{files[0].parent} holds several data files {[f.name for f in files[:6]]} and "
                  f"none is the only one named after a split in {list(splits)}; point --data at "
                  f"the file to evaluate")


def read_table(path: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS) -> Table:
  """Rows of a JSONL/JSON/parquet/arrow file or a Hugging Face dataset folder."""
  path = Path(path)
  if not path.exists():
    raise DataError(f"data path {path} does not exist")
  if path.is_file():
    base = (path.parent,)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
      return Table(_jsonl_rows(path), base, str(path), _count_lines(path))
    if suffix == ".json":
      rows = json_rows(path)
      return Table(rows, base, str(path), len(rows))
    if suffix in (".parquet", ".arrow"):
      fmt, files = hf_data_files(str(path))
      return Table(_arrow_rows(fmt, files), base, str(path), _arrow_num_rows(fmt, files))
    raise DataError(f"{path}: expected a .jsonl, .json, .parquet or .arrow file, or a folder")
  if (path / "state.json").is_file():
    fmt, files = hf_data_files(str(path))
    return Table(_arrow_rows(fmt, files), (path,), str(path), _arrow_num_rows(fmt, files))
  split_dir = _split_folder(path, splits)
  if split_dir is not None:
    return read_table(split_dir, splits)
  shards = _split_files(path, splits)
  if shards:
    return Table(_arrow_rows("parquet", shards), (path,), str(path),
                 _arrow_num_rows("parquet", shards))
  for pattern in ("*.jsonl", "*.json"):
    files = [f for f in sorted(path.glob(pattern)) if f.name not in _HF_METADATA_FILES]
    chosen = _pick_by_split(files, splits)
    if chosen is not None:
      return read_table(chosen, splits)
  raise DataError(f"{path}: found no data (expected one *.jsonl, *.parquet shards named after a "
                  f"split in {list(splits)}, a save_to_disk folder, or the benchmark's official "
                  f"files; see docs/evaluation.md)")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def resolve_image(value: Any, image_dirs: Sequence[Path], field: str = "image") -> Any:
  """Encoded bytes, an existing file path, or an in-memory image for `value`; BadRow otherwise.

  Accepts a Hugging Face Image struct {"bytes", "path"}, bytes, a path (absolute, or relative to
  one of `image_dirs`), a PIL image or a numpy array.
  """
  if isinstance(value, dict):
    if value.get("bytes"):
      return bytes(value["bytes"])
    value = value.get("path")
  if isinstance(value, (bytes, bytearray)):
    if not value:
      raise BadRow(f"no image: empty bytes in field {field!r}")
    return bytes(value)
  if value is None or value == "":
    raise BadRow(f"no image: field {field!r} is empty")
  if isinstance(value, (str, os.PathLike)):
    candidate = Path(value)
    tried = [candidate] if candidate.is_absolute() else [d / candidate for d in image_dirs]
    for option in tried:
      if option.is_file():
        return str(option)
    raise BadRow(f"missing image: {str(value)!r} (tried {[str(t) for t in tried]})")
  if hasattr(value, "shape") or hasattr(value, "convert"):
    return value
  raise BadRow(f"field {field!r}: expected an image path, bytes or {{bytes, path}}, got "
               f"{type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Official layouts
# --------------------------------------------------------------------------------------------

def _one_file(path: Path, pattern: str, what: str, prefer: Sequence[str] = ()) -> Path | None:
  found = sorted(path.glob(pattern))
  for token in prefer:
    chosen = [f for f in found if token in f.name]
    if len(chosen) == 1:
      return chosen[0]
  if len(found) > 1:
    raise DataError(f"{path} holds several {what} files {[f.name for f in found]}; point --data "
                    f"at the one to evaluate")
  return found[0] if found else None


def _vqa_split(questions_file: Path) -> str:
  # v2_OpenEnded_mscoco_val2014_questions.json -> val2014; test-dev2015 images live in test2015.
  for part in questions_file.stem.split("_"):
    if part[:1].isalpha() and part[-4:].isdigit():
      return part.replace("test-dev", "test")
  raise DataError(f"{questions_file.name}: cannot tell the COCO split from the file name")


def read_vqa_v2(path: Path) -> Table | None:
  """VQA v2 official files: *_questions.json (+ *_annotations.json beside it for answers).

  Images are found as COCO_{split}_{image_id:012}.jpg in {split}/, images/{split}/, images/ or
  the folder itself. Returns None when `path` is not in this layout.
  """
  if path.is_file():
    questions_file = path if path.name.endswith("_questions.json") else None
  else:
    questions_file = _one_file(path, "*_questions.json", "VQA questions", prefer=("val2014",))
  if questions_file is None:
    return None
  folder = questions_file.parent
  split = _vqa_split(questions_file)
  annotations_file = folder / questions_file.name.replace("OpenEnded_", "").replace(
      "_questions.json", "_annotations.json")
  answers: dict[int, list[str]] = {}
  if annotations_file.is_file():
    for annotation in load_json(annotations_file).get("annotations", []):
      answers[annotation["question_id"]] = [a["answer"] for a in annotation["answers"]]
  questions = load_json(questions_file).get("questions")
  if not isinstance(questions, list):
    raise DataError(f"{questions_file}: expected an object with a 'questions' list")

  def rows():
    for q in questions:
      image_id = q.get("image_id")
      image = f"COCO_{split}_{image_id:012d}.jpg" if isinstance(image_id, int) else None
      yield {"question_id": q.get("question_id"), "question": q.get("question"),
             "image": image, "answers": answers.get(q.get("question_id"))}

  dirs = (folder / split, folder / "images" / split, folder / "images", folder)
  return Table(rows(), dirs, str(questions_file), len(questions))


def read_chartqa(path: Path, splits: Sequence[str] = DEFAULT_SPLITS) -> Table | None:
  """ChartQA official files: {split}_human.json and {split}_augmented.json with images in png/.

  `path` may be the dataset root (holding test/, val/ ...), a split folder, or one JSON file.
  """
  if path.is_dir():
    # The official zip unpacks to "ChartQA Dataset/{split}/": accept its parent too.
    roots = [path] + sorted(d for d in path.iterdir() if d.is_dir())
    found = [r / s for s in splits for r in roots if (r / s / f"{s}_human.json").is_file()]
    if found:
      path = found[0]
  files = [path] if path.is_file() and path.suffix == ".json" else \
      sorted(path.glob("*_human.json")) + sorted(path.glob("*_augmented.json"))
  if not files:
    return None

  def rows():
    for file in files:
      human = file.stem.endswith("_human")
      for index, row in enumerate(json_rows(file)):
        if isinstance(row, dict):
          row = dict(row, human_or_machine=int(human), id=f"{file.stem}/{index}")
        yield row

  folder = files[0].parent
  return Table(rows(), (folder / "png", folder), ", ".join(map(str, files)))


def first_present(row: dict, *fields: str, default: Any = BadRow) -> Any:
  """The first of `fields` present (not None) in the row; BadRow naming them if none is."""
  for field in fields:
    if row.get(field) is not None:
      return row[field]
  if default is BadRow:
    raise BadRow(f"missing field: {' / '.join(repr(f) for f in fields)} (row has {sorted(row)[:12]})")
  return default


def table_or_official(path: str | os.PathLike,
                      official: Sequence[Callable[[Path], Table | None]] = (),
                      splits: Sequence[str] = DEFAULT_SPLITS) -> Table:
  """The official layout when one of the `official` readers recognises `path`, else rows."""
  path = Path(path)
  if not path.exists():
    raise DataError(f"data path {path} does not exist")
  for reader in official:
    table = reader(path)
    if table is not None:
      return table
  return read_table(path, splits)
