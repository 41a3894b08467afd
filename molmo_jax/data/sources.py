"""Record sources for training and evaluation: JSONL manifests, local Hugging Face data, and the
registry of source kinds (the demo's "synthetic" kind registers itself from molmo_jax.data.synthetic).

Every source is random access (`len(source)`, `source[i]`, grain's RandomAccessDataSource protocol)
and returns records in one schema, whatever the storage:

  {"image":         path str | encoded bytes | uint8 array [H, W, 3] | None (text only),
   "conversations": [[user, assistant, user, assistant, ...], ...]   one or more, plain str turns,
   "style":         str | None,        the "{style}:" prompt prefix (the reference's olmo/data/data_formatter.py (style prefixes))
   "weight":        float,             only when the data gives one (loss weight, the reference's olmo/train.py (loss))
   ...}                                any other fields of the data, kept as task metadata

Several conversations about one image are packed into one training example by the pipeline
(the reference's olmo/data/model_preprocessor.py (several conversations per image)). Turns alternate user / assistant, start with the user and end with an answer.
The JSONL manifest format is documented with examples in docs/data.md.

Legend: K = points of one pointing/counting record, given as [K, 2] (x, y).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

import numpy as np

from molmo_jax.preprocess import points as points_lib
from molmo_jax.preprocess.image_io import image_size
from molmo_jax.registry import Registry

POINT_TASKS = {"pointing": "pointing", "counting": "point_count"}   # task -> default style
POINT_UNITS = ("pixels", "percent")
NONE_ANSWER = "There are none."
_SCHEMA_KEYS = ("image", "conversations", "style", "weight")


class RecordError(ValueError):
  """A record of a data file is malformed; the message names the file, line/row and field."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

def normalise_turns(messages: Any, where: str) -> list[str]:
  """Turns as plain strings: accepts ["q", "a", ...] or [{"role": ..., "content": ...}, ...].

  Roles must alternate user / assistant starting with the user, and the last turn must be an
  answer (training targets and eval references both need it).
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise RecordError(f"{where}: expected a non-empty list of turns, got {_describe(messages)}")
  turns = []
  for k, message in enumerate(messages):
    expected_role = "user" if k % 2 == 0 else "assistant"
    if isinstance(message, Mapping):
      role, content = message.get("role"), message.get("content")
      if role != expected_role:
        raise RecordError(f"{where}[{k}].role: expected {expected_role!r} (turns alternate user/"
                          f"assistant, starting with the user), got {role!r}")
      message = content
    if not isinstance(message, str):
      raise RecordError(f"{where}[{k}]: expected a str turn or a {{role, content}} object with str "
                        f"content, got {_describe(message)}")
    turns.append(message)
  if len(turns) % 2:
    raise RecordError(f"{where}: {len(turns)} turns end with a user turn; the last turn must be "
                      "the assistant's answer")
  return turns


def _describe(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_weight(value: Any, where: str) -> float:
  # JSON's 1e400 reads as inf and NaN as nan: both would end a run later as a "NaN loss".
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
      or not math.isfinite(value)):
    raise RecordError(f"{where}.weight: expected a finite positive number, got "
                      f"{_describe(value)}")
  return float(value)


def _check_style(value: Any, where: str) -> str | None:
  if value is not None and not isinstance(value, str):
    raise RecordError(f"{where}.style: expected a str or null, got {_describe(value)}")
  return value


# --------------------------------------------------------------------------------------------
# JSONL manifests
# --------------------------------------------------------------------------------------------

class JsonlSource:
  """Custom data from a JSONL manifest: one JSON object per line (format in docs/data.md).

  Every line is validated when the manifest is opened; a bad line raises `RecordError` naming
  `file:line` and the field. Image paths are relative to `image_root` (default: the manifest's
  directory). Pointing/counting lines carry points and a label; their answers are written here
  with `format_points` / `format_count_answer` (when the points are in pixels the image's header is
  read to learn its post-EXIF size; the pipeline decodes the pixels with the model's alpha option).

  Args:
    path: the manifest.
    image_root: directory that relative image paths start from.
    check_images: check at open time that every image file exists.
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               check_images: bool = True):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"JSONL manifest {self.path!r} does not exist")
    self.image_root = os.fspath(image_root) if image_root else os.path.dirname(
        os.path.abspath(self.path))
    self.check_images = check_images
    self._records = self._load()

  def _load(self) -> list[dict[str, Any]]:
    records, self._lines = [], []
    with open(self.path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          records.append(self._parse_line(line, f"{self.path}:{number}"))
          self._lines.append(number)
    if not records:
      raise RecordError(f"{self.path}: the manifest has no records")
    return records

  def _parse_line(self, line: str, where: str) -> dict[str, Any]:
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as e:
      raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
      raise RecordError(f"{where}: expected a JSON object, got {_describe(raw)}")
    record = {k: v for k, v in raw.items() if k != "messages"}   # other fields stay as metadata
    record["image"] = self._image_path(raw.get("image"), where)
    record["style"] = _check_style(raw.get("style"), where)
    if "weight" in raw:
      record["weight"] = _check_weight(raw["weight"], where)
    forms = [k for k in ("messages", "conversations", "question") if k in raw]
    if len(forms) != 1:
      raise RecordError(f"{where}: expected exactly one of 'messages', 'conversations' or "
                        f"'question' (+ 'answer' or 'points'), got {forms or 'none'}")
    if forms[0] == "messages":
      record["conversations"] = [normalise_turns(raw["messages"], f"{where}: field messages")]
    elif forms[0] == "conversations":
      conversations = raw["conversations"]
      if not isinstance(conversations, list) or not conversations:
        raise RecordError(f"{where}: field conversations: expected a non-empty list of message "
                          f"lists, got {_describe(conversations)}")
      record["conversations"] = [normalise_turns(c, f"{where}: field conversations[{k}]")
                                 for k, c in enumerate(conversations)]
    else:
      self._parse_question(raw, record, where)
    return record

  def _image_path(self, image: Any, where: str) -> str | None:
    if image is None:
      return None
    if not isinstance(image, str) or not image:
      raise RecordError(f"{where}: field image: expected a path string or null, got "
                        f"{_describe(image)}")
    path = image if os.path.isabs(image) else os.path.join(self.image_root, image)
    if self.check_images and not os.path.isfile(path):
      raise RecordError(f"{where}: field image: file {path!r} does not exist")
    return path

  def _parse_question(self, raw: dict, record: dict, where: str) -> None:
    question = raw["question"]
    if not isinstance(question, str):
      raise RecordError(f"{where}: field question: expected a str, got {_describe(question)}")
    if ("answer" in raw) == ("points" in raw):
      raise RecordError(f"{where}: a 'question' needs exactly one of 'answer' or 'points'")
    if "answer" in raw:
      if not isinstance(raw["answer"], str):
        raise RecordError(f"{where}: field answer: expected a str, got {_describe(raw['answer'])}")
      record["conversations"] = [[question, raw["answer"]]]
      return
    task = raw.get("task")
    if task not in POINT_TASKS:
      raise RecordError(f"{where}: field task: a record with points needs task one of "
                        f"{sorted(POINT_TASKS)}, got {task!r}")
    label = raw.get("label")
    if not isinstance(label, str) or not label:
      raise RecordError(f"{where}: field label: expected a non-empty str, got {_describe(label)}")
    units = raw.get("point_units", "pixels")
    if units not in POINT_UNITS:
      raise RecordError(f"{where}: field point_units: expected one of {POINT_UNITS}, got {units!r}")
    try:
      points = np.asarray(raw["points"], np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
      raise RecordError(f"{where}: field points: expected a list of [x, y] pairs, got "
                        f"{_describe(raw['points'])}") from None
    if not np.isfinite(points).all():
      raise RecordError(f"{where}: field points: expected finite numbers, got "
                        f"{_describe(raw['points'])}")
    if units == "percent" and (points.min(initial=0) < 0 or points.max(initial=0) > 100):
      raise RecordError(f"{where}: field points: percent coordinates must lie in [0, 100]")
    if units == "pixels" and record["image"] is None:
      raise RecordError(f"{where}: field image: pixel points need the image to know its size")
    record["points"] = points
    record["style"] = record["style"] or POINT_TASKS[task]
    record["conversations"] = None   # written on access, once the image size is known

  def __len__(self) -> int:
    return len(self._records)

  def where(self, index: int) -> str:
    """`file:line` of record `index` (how errors about it are reported)."""
    return f"{self.path}:{self._lines[_check_index(index, len(self))]}"

  def __getitem__(self, index) -> dict[str, Any]:
    index = _check_index(index, len(self))
    record = dict(self._records[index])
    if record["conversations"] is None:
      where = f"{self.path}:{self._lines[index]}"
      record["conversations"] = [[record["question"], self._point_answer(record, where)]]
    return record

  def _point_answer(self, record: dict, where: str) -> str:
    points = record["points"]
    if record.get("point_units", "pixels") == "percent":
      size = (100.0, 100.0)
    else:
      size = image_size(record["image"])   # post-EXIF; the pixels are decoded by the pipeline
      if len(points) and ((points < 0).any() or (points > np.array(size)).any()):
        raise RecordError(f"{where}: field points: pixel points must lie inside the "
                          f"{size[0]}x{size[1]} image (after EXIF rotation), got {points.tolist()}")
    if record["task"] == "counting":
      return points_lib.format_count_answer(points, size, record["label"])
    if len(points) == 0:
      return NONE_ANSWER
    return points_lib.format_points(points, size, record["label"])

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, records={len(self)})"


def _check_index(index, length: int) -> int:
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"record index {index} out of range for {length} records")
  return index


# --------------------------------------------------------------------------------------------
# Hugging Face datasets stored locally (parquet, or arrow from `save_to_disk`)
# --------------------------------------------------------------------------------------------

def _pyarrow():
  try:
    import pyarrow  # noqa: F401 - optional dependency, only hf sources need it
    import pyarrow.parquet
  except ImportError:
    raise ImportError("hf sources read parquet/arrow files with pyarrow, which is not installed; "
                      "`pip install pyarrow`, or convert the data to a JSONL manifest") from None
  return pyarrow


def hf_data_files(path: str, split: str | None = None) -> tuple[str, list[str]]:
  """("parquet" | "arrow", files) of a local dataset.

  Accepts a *.parquet or *.arrow file, a directory of *.parquet files (or their `split`
  subdirectory), a `save_to_disk` directory (state.json lists its arrow files) and a
  `DatasetDict.save_to_disk` directory (dataset_dict.json; `split` picks the subdirectory).
  """
  if os.path.isfile(path):
    for fmt in ("parquet", "arrow"):
      if path.endswith("." + fmt):
        return fmt, [path]
    raise ValueError(f"hf source {path!r}: expected a .parquet or .arrow file or a directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"hf source {path!r} does not exist")
  if os.path.isfile(os.path.join(path, "dataset_dict.json")):
    with open(os.path.join(path, "dataset_dict.json")) as f:
      splits = json.load(f).get("splits", [])
    if split not in splits:
      raise ValueError(f"hf source {path!r} is a DatasetDict with splits {splits}; set "
                       f"options.split to one of them (got {split!r})")
    return hf_data_files(os.path.join(path, split))
  if os.path.isfile(os.path.join(path, "state.json")):
    with open(os.path.join(path, "state.json")) as f:
      files = [d["filename"] for d in json.load(f).get("_data_files", [])]
    if not files:
      raise ValueError(f"hf source {path!r}: state.json lists no _data_files")
    return "arrow", [os.path.join(path, name) for name in files]
  for folder in ([os.path.join(path, split)] if split else []) + [path]:
    if os.path.isdir(folder):
      files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet"))
      if files:
        return "parquet", files
  raise ValueError(f"hf source {path!r}: no *.parquet files, state.json or dataset_dict.json found")


class HFSource:
  """Rows of a local Hugging Face dataset as records, read with pyarrow (memory-mapped).

  Column mapping (None leaves a field out):
    image_column: HF Image struct {"bytes", "path"}, a path string, raw bytes, or null.
    messages_column: a list of turns ({"role", "content"} objects or strings), or a list of such
      lists (several conversations). When None, question_column + answer_column are used; an
      answer cell may be a list of strings (first = training target, all kept as "answers").
    style_column / weight_column: per-row style and loss weight.
  Relative image paths start at `image_root` (default: the dataset directory). Rows are checked on
  access; a bad row raises `RecordError` naming the dataset, the row and the column.
  """

  def __init__(self, path: str | os.PathLike, split: str | None = None,
               image_column: str | None = "image", messages_column: str | None = None,
               question_column: str | None = "question", answer_column: str | None = "answer",
               style_column: str | None = None, weight_column: str | None = None,
               image_root: str | os.PathLike | None = None):
    self.path = os.fspath(path)
    self.split = split
    self.format, self.files = hf_data_files(self.path, split)
    base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
    self.image_root = os.fspath(image_root) if image_root else base
    if messages_column is None and not (question_column and answer_column):
      raise ValueError(f"hf source {self.path!r}: set messages_column, or both question_column "
                       "and answer_column")
    self.columns = {"image": image_column, "messages": messages_column,
                    "question": None if messages_column else question_column,
                    "answer": None if messages_column else answer_column,
                    "style": style_column, "weight": weight_column}
    self._table = None
    table = self._open()
    missing = [c for c in self.columns.values() if c and c not in table.column_names]
    if missing:
      raise ValueError(f"hf source {self.path!r}: column(s) {missing} not found; the data has "
                       f"{table.column_names}")
    self._length = table.num_rows

  def _open(self):
    if self._table is None:
      pa = _pyarrow()
      wanted = sorted({c for c in self.columns.values() if c})
      tables = []
      for name in self.files:
        if self.format == "parquet":
          table = pa.parquet.read_table(name, memory_map=True)
        else:
          table = pa.ipc.open_stream(pa.memory_map(name, "r")).read_all()
        tables.append(table.select([c for c in wanted if c in table.column_names]))
      self._table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return self._table

  def __getstate__(self):
    # Worker processes reopen the memory-mapped files instead of receiving a copy of the data.
    return {**self.__dict__, "_table": None}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index) -> dict[str, Any]:
    row_index = _check_index(index, len(self))
    table = self._open()
    row = {field: table.column(column)[row_index].as_py()
           for field, column in self.columns.items() if column}
    where = f"{self.path} row {row_index}"
    record: dict[str, Any] = {"image": self._image(row.get("image"), where),
                              "style": _check_style(row.get("style"), where)}
    if row.get("weight") is not None:
      record["weight"] = _check_weight(row["weight"], where)
    if self.columns["messages"]:
      record["conversations"] = self._conversations(row["messages"], where)
    else:
      question, answers = row["question"], row["answer"]
      answers = answers if isinstance(answers, list) else [answers]
      answers_ok = bool(answers) and all(isinstance(a, str) for a in answers)
      if not isinstance(question, str) or not answers_ok:
        raise RecordError(f"{where}: columns {self.columns['question']!r}/"
                          f"{self.columns['answer']!r}: expected a str question and a str (or list "
                          f"of str) answer, got {_describe(question)} / {_describe(row['answer'])}")
      record["conversations"] = [[question, answers[0]]]
      record["answers"] = answers
    return record

  def _image(self, cell: Any, where: str) -> str | bytes | None:
    if isinstance(cell, dict):
      cell = cell.get("bytes") or cell.get("path")
    if cell is None or isinstance(cell, bytes):
      return cell
    if isinstance(cell, str) and cell:
      return cell if os.path.isabs(cell) else os.path.join(self.image_root, cell)
    raise RecordError(f"{where}: column {self.columns['image']!r}: expected an image struct "
                      f"{{bytes, path}}, a path or bytes, got {_describe(cell)}")

  def _conversations(self, cell: Any, where: str) -> list[list[str]]:
    column = f"{where}: column {self.columns['messages']!r}"
    if isinstance(cell, list) and cell and isinstance(cell[0], list):
      return [normalise_turns(c, f"{column}[{k}]") for k, c in enumerate(cell)]
    return [normalise_turns(cell, column)]

  def __repr__(self) -> str:
    return f"HFSource({self.path!r}, split={self.split!r}, rows={len(self)})"


# --------------------------------------------------------------------------------------------
# Source configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data source of a mixture.

  Attributes:
    name: unique name (errors and statistics use it).
    kind: a registered source kind: "jsonl", "hf", or one a plugin adds ("synthetic").
    path: manifest file (jsonl) or dataset directory / parquet file(s) (hf).
    rate: explicit mixture rate; leave None everywhere to use the sqrt(size) rule (the reference's launch_scripts/train_multitask_model.py and train_captioner.py).
    size: size that the sqrt rule counts instead of the true length (e.g. pixmo_cap as 50,000).
    group: group of the sqrt rule when the config gives group rates.
    style: style for records that carry none.
    message_format: "role" (User:/Assistant:) or "none" (captioning stage, the reference's olmo/data/data_formatter.py (chat format)).
    options: kind-specific (`SourceKind.options`): jsonl {image_root, check_images}; hf (see
      `HFSource`); synthetic {num_examples, seed, split, task, config (SyntheticConfig fields)}.
  """

  name: str
  kind: str
  path: str = ""
  rate: float | None = None
  size: int | None = None
  group: str | None = None
  style: str | None = None
  message_format: str = "role"
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    where = f"source {self.name!r}"
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"source name: expected a non-empty str, got {self.name!r}")
    try:
      kind = SOURCE_KINDS.get(self.kind)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if kind.needs_path and not self.path:
      raise ValueError(f"{where}: kind {self.kind!r} needs a path")
    if self.rate is not None and not self.rate > 0:
      raise ValueError(f"{where}: rate must be positive, got {self.rate}")
    if self.size is not None and not self.size > 0:
      raise ValueError(f"{where}: size must be positive, got {self.size}")
    if self.message_format not in ("role", "none"):
      raise ValueError(f"{where}: message_format must be 'role' or 'none', got "
                       f"{self.message_format!r}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SourceConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"source {d.get('name')!r}: unknown field(s) {unknown}; known: "
                       f"{sorted(known)}")
    d["options"] = dict(d.get("options") or {})
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """How to open one kind of source: `open(cfg)` -> a random-access source of records."""

  open: Callable[["SourceConfig"], Any]
  options: tuple[str, ...] = ()
  needs_path: bool = True


SOURCE_KINDS = Registry(
    "data source kind", hint="kinds from other modules register when they are imported (the "
    "demo's 'synthetic': add 'molmo_jax.data.synthetic' to config.plugins)")


def open_source(cfg: SourceConfig) -> Any:
  """The random-access source a `SourceConfig` describes."""
  kind = SOURCE_KINDS.get(cfg.kind)
  unknown = sorted(set(cfg.options) - set(kind.options))
  if unknown:
    raise ValueError(f"source {cfg.name!r}: unknown option(s) {unknown} for kind {cfg.kind!r}; "
                     f"known: {list(kind.options)}")
  return kind.open(cfg)


SOURCE_KINDS.register("jsonl", SourceKind(lambda cfg: JsonlSource(cfg.path, **cfg.options),
                                          ("image_root", "check_images")))
SOURCE_KINDS.register("hf", SourceKind(lambda cfg: HFSource(cfg.path, **cfg.options),
                                       ("split", "image_column", "messages_column",
                                        "question_column", "answer_column", "style_column",
                                        "weight_column", "image_root")))
