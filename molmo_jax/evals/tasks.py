"""The benchmark task registry (the reference's launch_scripts/eval_downstream.py): what to read, how to ask, how to score, what the paper got.

    from molmo_jax.evals import tasks
    task = tasks.get_task("chartqa")
    stream = task.load("data/chartqa")          # EvalExamples (and Skips for unusable rows)

A `Task` bundles the reader of the data as users keep it (readers.py), the prompt and style prefix
(benchmarks.py), the generation settings the paper used (36 crops for the high-resolution set, the
model's 12 for counting; 12 new tokens, 192 for pointing/counting) and the metric. `PAPER_TABLE_1`
holds the released models' numbers from the paper's Table 1 (arXiv 2409.17146); the spec itself only
gives the 11-benchmark averages (68.6 / 74.6 / 77.3 / 81.2, the reference's README (reported numbers), which these rows reproduce.
Tasks outside Table 1 (PixMo-Points, the demo's synthetic tasks) have no paper number.

`TASKS` is a registry: other modules add tasks when imported (`register_task`), e.g. the demo's
synthetic_count / synthetic_points from molmo_jax.evals.synthetic_tasks.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from molmo_jax.evals import benchmarks as bm
from molmo_jax.evals.metrics import per_category_average
from molmo_jax.evals.readers import (BadRow, DataError, Skip, Table, read_chartqa, read_vqa_v2,
                                     table_or_official)
from molmo_jax.evals.readers_ai2d import read_ai2d_official
from molmo_jax.registry import Registry

EvalExample = bm.EvalExample
HIGH_RES_CROPS = 36
LOW_RES_CROPS = 12
SHORT_ANSWER_TOKENS = 12
POINTING_TOKENS = 192

# Paper Table 1 column order = the 11 academic benchmarks.
ACADEMIC_TASKS = ("ai2d", "chartqa", "vqav2", "docvqa", "infovqa", "textvqa", "realworldqa",
                  "mmmu", "mathvista", "countbenchqa", "pixmo_count")
_TABLE_1_ROWS = {
  "molmoe-1b": (86.4, 78.0, 83.9, 77.7, 53.9, 78.8, 60.4, 34.9, 34.0, 87.2, 79.6),
  "molmo-7b-o": (90.7, 80.4, 85.3, 90.8, 70.0, 80.4, 67.5, 39.3, 44.5, 89.0, 83.3),
  "molmo-7b-d": (93.2, 84.1, 85.6, 92.2, 72.6, 81.7, 70.7, 45.3, 51.6, 88.5, 84.8),
  "molmo-72b": (96.3, 87.3, 86.5, 93.5, 81.9, 83.1, 75.2, 54.1, 58.6, 91.2, 85.2),
}
# task -> {model preset name -> score in percent}
PAPER_TABLE_1: dict[str, dict[str, float]] = {
  task: {model: row[i] for model, row in _TABLE_1_ROWS.items()} for i, task in enumerate(ACADEMIC_TASKS)}
# README / the reference's README (reported numbers) averages over the 11 benchmarks.
PAPER_AVERAGE = {"molmoe-1b": 68.6, "molmo-7b-o": 74.6, "molmo-7b-d": 77.3, "molmo-72b": 81.2}


@dataclasses.dataclass
class ExampleStream:
  """Examples (and Skips) in dataset order; `total` is the row count when known cheaply."""

  items: Iterable[EvalExample | Skip]
  total: int | None
  description: str


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  title: str                       # benchmark and the split the paper reports
  metric: str                      # headline key of the metrics dict
  max_crops: int | None            # None: the model's own default
  max_new_tokens: int
  load: Callable[[Any], ExampleStream]
  score: Callable[..., dict | None]
  paper: Mapping[str, float] = dataclasses.field(default_factory=dict)
  paper_note: str = ""             # e.g. "test server": our local split is not the paper's
  data_help: str = ""
  summarize: Callable[[Sequence[dict]], dict] | None = None
  options: tuple[str, ...] = ()    # names `evaluate(task_options=...)` accepts
  # Tasks whose data is built rather than read (synthetic): (limit, **task_options) -> the
  # `data` that `load` takes, used when no data is given.
  default_data: Callable[..., Any] | None = None

  @property
  def in_average(self) -> bool:
    return self.name in ACADEMIC_TASKS


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _row_id(row: dict, id_fields: Sequence[str], index: int) -> str:
  for field in id_fields:
    if row.get(field) is not None:
      return str(row[field])
  return str(index)


def _examples(table: Table, parse, id_fields: Sequence[str]) -> Iterator[EvalExample | Skip]:
  for index, row in enumerate(table.rows):
    if isinstance(row, Skip):
      yield row
      continue
    row = dict(row, _row_index=index)
    row_id = _row_id(row, id_fields, index)
    try:
      yield parse(row, row_id, table)
    except BadRow as e:
      yield Skip(row_id, str(e))
    except (KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
      # A malformed row costs its example only; the reason is reported with the metrics.
      yield Skip(row_id, f"malformed row: {type(e).__name__}: {e}")


def _path(data: Any, task: str) -> Path:
  if data is None:
    raise DataError(f"task {task!r} needs --data: {TASK_DATA_HELP.get(task, 'see docs/evaluation.md')}")
  if not isinstance(data, (str, Path)):
    raise DataError(f"task {task!r}: data must be a path, got {type(data).__name__}")
  return Path(data)


def file_loader(task: str, parse, id_fields: Sequence[str] = (),
                official: Sequence[Callable[[Path], Table | None]] = (),
                splits: Sequence[str] = ("test", "validation", "val", "testmini")):
  def load(data: Any) -> ExampleStream:
    table = table_or_official(_path(data, task), official, splits)
    return ExampleStream(_examples(table, parse, id_fields), table.num_rows, table.description)
  return load


def counting_summary(rows: Sequence[dict]) -> dict:
  """Per-GT-count accuracy and its unweighted mean (the reference's `per_category_average`)."""
  scored = [r for r in rows if r.get("scores")]
  return per_category_average([r["scores"]["correct"] for r in scored],
                              [r["targets"]["count"] for r in scored])


def pointing_summary(rows: Sequence[dict]) -> dict:
  """F1 on the scenes that contain the asked-for kind and on those that do not, apart: the
  overall mean mixes point placement with saying "There are none."."""
  scored = [r for r in rows if r.get("scores")]
  out = {}
  for key, keep in (("f1_with_objects", lambda n: n > 0), ("f1_without_objects", lambda n: n == 0)):
    values = [r["scores"]["f1"] for r in scored if keep(r["targets"]["count"])]
    if values:
      out[key] = float(sum(values) / len(values))
  return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

TASK_DATA_HELP = {
  "ai2d": "official ai2d-all.zip folder + ai2d_test_ids.csv, or rows (reference build / lmms-lab/ai2d)",
  "chartqa": "HuggingFaceM4/ChartQA test parquet, or the official test/ folder (test_*.json + png/)",
  "vqav2": "v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json + val2014/",
  "docvqa": "official val_v1.0.json + documents/, or HuggingFaceM4/DocumentVQA parquet",
  "infovqa": "official infographicsVQA_val_v1.0_withQT.json + images/",
  "textvqa": "official TextVQA_0.5.1_val.json + train_images/, or facebook/textvqa parquet",
  "realworldqa": "xai-org/RealworldQA test parquet",
  "mmmu": "MMMU/MMMU validation parquet (all 30 subject folders under one directory)",
  "mathvista": "AI4Math/MathVista testmini parquet",
  "countbenchqa": "CountBenchQA rows (image, question, count), or nielsr/countbench parquet + "
                  "countbench_paired_questions.json",
  "pixmo_count": "allenai/pixmo-count test rows with images downloaded (an 'image' column)",
  "pixmo_points": "allenai/pixmo-points-eval rows with images downloaded (an 'image' column)",
}


def _file_task(name, title, metric, max_crops, max_new_tokens, parse, score, id_fields=(),
               official=(), paper_note="", summarize=None, splits=("test", "validation", "val")):
  return Task(name=name, title=title, metric=metric, max_crops=max_crops,
              max_new_tokens=max_new_tokens, load=file_loader(name, parse, id_fields, official, splits),
              score=score, paper=PAPER_TABLE_1.get(name, {}), paper_note=paper_note,
              data_help=TASK_DATA_HELP[name], summarize=summarize)


def _build_registry() -> dict[str, Task]:
  hi, lo, short, long = HIGH_RES_CROPS, LOW_RES_CROPS, SHORT_ANSWER_TOKENS, POINTING_TOKENS
  tasks = [
    _file_task("ai2d", "AI2D (test)", "mc_ai2d_transparent", hi, short, bm.parse_ai2d,
               bm.score_ai2d, ("question_id",), (read_ai2d_official,)),
    _file_task("chartqa", "ChartQA (test)", "relaxed_correctness", hi, short,
               bm.short_answer_parser("chart_qa", question_fields=("query", "question"),
                                      answer_fields=("label", "answers"),
                                      image_fields=("image", "imgname")),
               bm.score_chartqa, ("id",), (read_chartqa,)),
    _file_task("vqav2", "VQA v2.0 (val; paper: test-dev)", "vqa_score", hi, short,
               bm.short_answer_parser("vqa2"), bm.score_vqa, ("question_id",), (read_vqa_v2,),
               paper_note="test-dev server", splits=("validation", "val", "test")),
    _file_task("docvqa", "DocVQA (val; paper: test)", "anls", hi, short,
               bm.short_answer_parser("doc_qa"), bm.score_anls, ("questionId",),
               paper_note="test server", splits=("validation", "val", "test")),
    _file_task("infovqa", "InfographicVQA (val; paper: test)", "anls", hi, short,
               bm.short_answer_parser("info_qa", image_fields=("image", "image_local_name"),
                                      extra_dirs=("images",)),
               bm.score_anls, ("questionId",), paper_note="test server",
               splits=("validation", "val", "test")),
    _file_task("textvqa", "TextVQA (val)", "vqa_score", hi, short,
               bm.short_answer_parser("text_vqa", image_name=bm.textvqa_image_name,
                                      extra_dirs=("train_images", "test_images", "images")),
               bm.score_vqa, ("question_id",), splits=("validation", "val")),
    _file_task("realworldqa", "RealWorldQA", "real_world_qa_score", hi, short,
               bm.parse_realworldqa, bm.score_realworldqa, ("id",)),
    _file_task("mmmu", "MMMU (val)", "mmmu_score", hi, short, bm.parse_mmmu, bm.score_mmmu,
               ("id",), splits=("validation",)),
    _file_task("mathvista", "MathVista (testmini)", "math_vista_score", hi, short,
               bm.parse_mathvista, bm.score_mathvista, ("pid",), splits=("testmini",)),
    _file_task("countbenchqa", "CountBenchQA", "correct", lo, long, bm.parse_countbench,
               bm.score_count, ("example_id",), summarize=counting_summary,
               splits=("test", "train")),
    _file_task("pixmo_count", "PixMo-Count (test)", "correct", lo, long, bm.parse_pixmo_count,
               bm.score_count, summarize=counting_summary),
    _file_task("pixmo_points", "PixMo-Points eval", "f1", lo, long, bm.parse_pixmo_points,
               bm.score_pixmo_points, splits=("test",)),
  ]
  for task in tasks:
    register_task(task)


TASKS = Registry("task", hint="tasks from other modules register when they are imported (the "
                 "demo's synthetic_*: molmo_jax.evals.synthetic_tasks, which eval.py imports)")


def register_task(task: Task) -> Task:
  """Adds `task` under `task.name` (a plugin module calls this when imported)."""
  return TASKS.register(task.name, task)


_build_registry()


def get_task(name: str | Task) -> Task:
  if isinstance(name, Task):
    return name
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                     f"(or 'all' for the 11 academic benchmarks); {TASKS.hint}")
  return TASKS.get(name)


def check_options(task: Task, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """`options` after checking every name is one the task accepts."""
  options = dict(options or {})
  unknown = sorted(set(options) - set(task.options))
  if unknown:
    accepted = ", ".join(task.options) or "none"
    raise ValueError(f"task {task.name!r}: unknown task_options {unknown}; accepted: {accepted}")
  return options


def take(stream: ExampleStream, limit: int | None) -> ExampleStream:
  """The first `limit` rows of a stream (skipped rows count, so a limit always names the same rows)."""
  if limit is None:
    return stream
  total = limit if stream.total is None else min(limit, stream.total)
  return ExampleStream(itertools.islice(stream.items, limit), total, stream.description)
