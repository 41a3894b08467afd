"""The evaluation loop: batched generation, resumable JSONL predictions, metrics, summary table.

    metrics = evaluate(predictor, "chartqa", data="data/chartqa", output_dir="eval_out")
    print(format_summary([metrics]))

Legend: B = batch size, rounded up to a multiple of D = devices of the predictor's mesh.

Each answered example becomes one line of `{output_dir}/{task}.predictions.jsonl` (id, prompt,
prediction, targets, per-example scores), appended and flushed batch by batch. A re-run reads that
file first, cuts off a partially written last line, and asks only about ids not in it, so rows are
never duplicated. Examples that cannot be evaluated (missing or unreadable image, malformed row,
duplicate id) are counted with their reasons in `{task}.metrics.json`; they are never silently
scored. Every batch is padded to the same B (copies of its last example, answers dropped) so a run
compiles one generation shape per prompt-length bucket.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from molmo_jax.evals import tasks as tasks_lib
from molmo_jax.evals.metrics import average_metrics
from molmo_jax.evals.readers import DataError, Skip
from molmo_jax.generate import SamplingConfig
from molmo_jax.preprocess.image_io import load_image
from molmo_jax.preprocess.inputs import load_pixels

_log = logging.getLogger(__name__)
MAX_LISTED_SKIPS = 100


# --------------------------------------------------------------------------------------------
# Predictions file
# --------------------------------------------------------------------------------------------

def read_predictions(path: Path) -> dict[str, dict]:
  """Rows of an existing predictions file by id; an unterminated last line is cut off in place."""
  if not path.exists():
    return {}
  content = path.read_bytes()
  complete = content.rfind(b"\n") + 1
  if complete < len(content):
    _log.warning("%s: removing a partially written last line (%d bytes)", path,
                 len(content) - complete)
    with open(path, "r+b") as f:
      f.truncate(complete)
  rows: dict[str, dict] = {}
  for number, line in enumerate(content[:complete].split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {number} is not valid JSON ({e}); it is not a partial last "
                      f"line, so fix or delete the file") from None
    rows[str(row["id"])] = row
  return rows


def model_fingerprint(predictor: Any) -> str | None:
  """A short digest of the predictor's config and a few parameter sums, so that a retrained or
  different checkpoint never resumes another model's predictions file. None for predictors
  without parameters (test doubles)."""
  params = getattr(predictor, "params", None)
  config = getattr(predictor, "config", None)
  if params is None or config is None:
    return None
  import hashlib
  import jax
  import jax.numpy as jnp
  # Sums accumulate in fp32 without a full-precision copy of each (possibly sharded) leaf, and
  # come back to the host in one transfer.
  sums = [float(x) for x in jax.device_get([jnp.sum(leaf, dtype=jnp.float32)
                                            for leaf in jax.tree.leaves(params)])]
  digest = hashlib.sha1(config.to_json().encode())
  digest.update(json.dumps([round(x, 6) for x in sums]).encode())
  return digest.hexdigest()[:16]


def _check_settings(path: Path, settings: dict) -> None:
  """Refuses to mix predictions made with different generation settings in one file."""
  if path.exists():
    previous = json.loads(path.read_text())
    if previous != settings:
      changed = {k: (previous.get(k), settings.get(k)) for k in settings | previous
                 if previous.get(k) != settings.get(k)}
      raise DataError(f"{path.parent} holds predictions made with other settings {changed} "
                      f"(old, new); use another --output folder or delete those files")
  else:
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _json_ready(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  return value


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def device_multiple(predictor: Any) -> int:
  """Batch sizes must be a multiple of the data-parallel mesh size (1 without a mesh)."""
  mesh = getattr(predictor, "mesh", None)
  return int(mesh.size) if mesh is not None else 1


class _Batcher:
  """Collects loaded examples; answers, scores and writes them a full padded batch at a time."""

  def __init__(self, predictor, task, batch_size: int, sampling: SamplingConfig, out_file):
    self.predictor, self.task, self.sampling, self.out_file = predictor, task, sampling, out_file
    multiple = device_multiple(predictor)
    self.batch_size = math.ceil(batch_size / multiple) * multiple
    self.pending: list[tuple[Any, Any]] = []          # (EvalExample, pixels [H, W, 3] or None)
    self.rows: dict[str, dict] = {}

  def add(self, example, pixels) -> None:
    self.pending.append((example, pixels))
    if len(self.pending) == self.batch_size:
      self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    batch = self.pending + [self.pending[-1]] * (self.batch_size - len(self.pending))
    predictions = self.predictor.predict([p for _, p in batch], [e.full_prompt for e, _ in batch],
                                         sampling=self.sampling)
    lines = []
    for (example, pixels), prediction in zip(self.pending, predictions):
      image_size = None if pixels is None else (int(pixels.shape[1]), int(pixels.shape[0]))
      try:
        scores = self.task.score(prediction.text, example, image_size)
      except Exception as e:
        raise RuntimeError(f"{self.task.name}: scoring example {example.id!r} failed: {e}") from e
      row = {"id": example.id, "prompt": example.full_prompt, "prediction": prediction.text,
             "targets": _json_ready(example.targets), "scores": scores,
             "finish_reason": prediction.finish_reason, "image_size": image_size}
      self.rows[example.id] = row
      lines.append(json.dumps(row) + "\n")
    if self.out_file is not None:
      self.out_file.write("".join(lines))
      self.out_file.flush()
    self.pending = []


def _load_pixels(example, predictor: Any) -> Any:
  """The example's pixels, alpha handled as the predictor's config says (default: dropped)."""
  if example.image is None:
    return None
  config = getattr(predictor, "config", None)
  if config is None:   # a stand-in predictor without a config: the reference's default
    return load_image(example.image, name=f"example {example.id}")
  return load_pixels(example.image, config, name=f"example {example.id}")


def _progress(total: int | None, enabled: bool, name: str):
  if not enabled:
    return None
  from molmo_jax.progress import progress
  return progress(total, name, unit="ex")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _skip_summary(skips: Sequence[Skip]) -> tuple[dict[str, int], list[dict]]:
  reasons = collections.Counter(s.reason.split(":")[0].strip() for s in skips)
  listed = [{"id": s.id, "reason": s.reason} for s in skips[:MAX_LISTED_SKIPS]]
  return dict(reasons.most_common()), listed


def _paper_model(predictor: Any, paper_model: str | None) -> str | None:
  if paper_model is not None:
    return paper_model
  name = getattr(getattr(predictor, "config", None), "name", None)
  return name if name in tasks_lib.PAPER_AVERAGE else None


def evaluate(predictor: Any, task: str | tasks_lib.Task, data: Any = None, limit: int | None = None,
             output_dir: str | os.PathLike | None = None, batch_size: int = 8, *,
             max_crops: int | None = None, max_new_tokens: int | None = None,
             task_options: dict | None = None, progress: bool = True,
             paper_model: str | None = None) -> dict:
  """Evaluates `predictor` on one task and returns its metrics dict (also written as JSON).

  Args:
    predictor: a `molmo_jax.predictor.Predictor`, or any object with the same
      `predict(images, prompts, sampling=...) -> [Prediction]` (tests inject fixed answers).
      Generation is sharded when the Predictor was built with a mesh, e.g.
      `mesh=sharding.make_mesh(data=-1)` over all local devices, as eval.py does.
    task: a task name (see `tasks.TASKS`) or a Task.
    data: the dataset path; for tasks that build their data (`Task.default_data`, the synthetic
      ones) None (built from task_options and limit) or what `task.load` takes.
    limit: evaluate the first `limit` rows only (the number of examples for synthetic tasks).
    output_dir: where predictions JSONL / metrics JSON go (None: nothing is written, no resume).
    batch_size: examples per generation call, rounded up to a multiple of the mesh size.
    max_crops / max_new_tokens: override the task's settings (None: the paper's).
    task_options: per-task options (`Task.options`): for synthetic tasks {"config":
      SyntheticConfig, "seed": int}.
    paper_model: which Table-1 row to compare with (default: the predictor's config name).

  Returns:
    the metrics file's content: every metric of the task as a fraction at the top level (e.g.
    "correct", "f1") and under "metrics", the headline as a percentage ("score"), counts of
    evaluated / scored / skipped examples with skip reasons, the paper's numbers and the settings.
  """
  task = tasks_lib.get_task(task)
  options = tasks_lib.check_options(task, task_options)
  if task.default_data is not None and data is None:
    data = task.default_data(limit, **options)
  stream = tasks_lib.take(task.load(data), limit)
  crops = max_crops if max_crops is not None else task.max_crops
  sampling = SamplingConfig(max_new_tokens=max_new_tokens or task.max_new_tokens)
  settings = {"task": task.name, "max_crops": crops, "max_new_tokens": sampling.max_new_tokens,
              "data": stream.description}
  fingerprint = model_fingerprint(predictor)
  if fingerprint is not None:
    settings["model"] = fingerprint

  out_dir = Path(output_dir) if output_dir is not None else None
  done: dict[str, dict] = {}
  out_file = None
  if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir / f"{task.name}.settings.json", settings)
    predictions_path = out_dir / f"{task.name}.predictions.jsonl"
    done = read_predictions(predictions_path)
    out_file = open(predictions_path, "a", encoding="utf-8")

  previous_crops = getattr(predictor, "max_crops", None)
  if crops is not None and hasattr(predictor, "max_crops"):
    predictor.max_crops = crops
  batcher = _Batcher(predictor, task, batch_size, sampling, out_file)
  order: list[str] = []
  seen: set[str] = set()
  skips: list[Skip] = []
  bar = _progress(stream.total, progress, task.name)
  try:
    for item in stream.items:
      if bar is not None:
        bar.update(1)
      if isinstance(item, Skip):
        skips.append(item)
        continue
      if item.id in seen:
        skips.append(Skip(item.id, "duplicate id: the dataset has this id more than once"))
        continue
      seen.add(item.id)
      order.append(item.id)
      if item.id in done:
        continue
      try:
        pixels = _load_pixels(item, predictor)
      except (OSError, ValueError) as e:
        order.pop()
        skips.append(Skip(item.id, f"unreadable image: {e}"))
        continue
      batcher.add(item, pixels)
    batcher.flush()
  finally:
    if bar is not None:
      bar.close()
    if out_file is not None:
      out_file.close()
    if crops is not None and hasattr(predictor, "max_crops"):
      predictor.max_crops = previous_crops

  rows = [batcher.rows.get(i) or done[i] for i in order]
  result = _result(task, rows, skips, settings, _paper_model(predictor, paper_model))
  result["resumed"] = sum(1 for i in order if i in done)
  if out_dir is not None:
    result["predictions_file"] = str(out_dir / f"{task.name}.predictions.jsonl")
    (out_dir / f"{task.name}.metrics.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


def _result(task: tasks_lib.Task, rows: list[dict], skips: list[Skip], settings: dict,
            paper_model: str | None) -> dict:
  if not rows and skips:
    raise DataError(f"{settings['data']}: all {len(skips)} examples were skipped ({task.name}), "
                    f"e.g. {skips[0].id}: {skips[0].reason}")
  if not rows:
    raise DataError(f"{settings['data']}: no examples for {task.name} (empty data file?)")
  scored = [r["scores"] for r in rows if r.get("scores") is not None]
  values = average_metrics(scored)
  if task.summarize is not None and scored:
    values.update(task.summarize(rows))
  headline = values.get(task.metric)
  reasons, listed = _skip_summary(skips)
  return {
    **values,
    "task": task.name, "title": task.title, "metric": task.metric,
    "score": None if headline is None else 100.0 * headline,
    "metrics": values,
    "num_examples": len(rows) + len(skips), "evaluated": len(rows), "scored": len(scored),
    "skipped": len(skips), "skip_reasons": reasons, "skipped_examples": listed,
    "paper_model": paper_model,
    "paper_score": task.paper.get(paper_model) if paper_model else None,
    "paper": dict(task.paper), "paper_note": task.paper_note, "settings": settings,
  }


def evaluate_suite(predictor: Any, data_root: str | os.PathLike,
                   task_names: Iterable[str] = tasks_lib.ACADEMIC_TASKS, **kwargs) -> dict:
  """Runs several tasks, each on `data_root/<task>`; a task without its folder is reported missing."""
  root = Path(data_root)
  if not root.is_dir():
    raise DataError(f"--task all needs --data to be a folder with one subfolder per task "
                    f"({', '.join(tasks_lib.ACADEMIC_TASKS)}); {root} is not a folder")
  task_names = list(task_names)
  found = [name for name in task_names if (root / name).exists()]
  missing = [name for name in task_names if name not in found]
  if not found:
    raise DataError(f"--data {root}: none of the task folders {', '.join(task_names)} is there "
                    f"(it holds {_listing(root)}); give the folder that contains them")
  if missing:
    _log.warning(
        "--data %s: found task folders %s; missing %s (reported as missing)", root,
        ", ".join(found), ", ".join(missing))
  results = [evaluate(predictor, name, data=root / name, **kwargs) for name in found]
  return {"results": results, "found": found, "missing": missing,
          "average": suite_average(results)}


def _listing(root: Path, limit: int = 6) -> str:
  names = sorted(p.name for p in root.iterdir())
  if not names:
    return "nothing"
  return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def suite_average(results: Sequence[dict]) -> dict:
  """Mean of the 11 academic headline scores; `complete` is False when some are missing."""
  scores = [r["score"] for r in results if r["task"] in tasks_lib.ACADEMIC_TASKS
            and r["score"] is not None]
  return {"score": sum(scores) / len(scores) if scores else None, "tasks": len(scores),
          "complete": len(scores) == len(tasks_lib.ACADEMIC_TASKS)}


# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------

def _cell(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def format_summary(results: Sequence[dict], average: dict | None = None,
                   missing: Sequence[str] = ()) -> str:
  """A plain-text table: task, metric, our score, the paper's, examples and skips (percent)."""
  paper_model = next((r["paper_model"] for r in results if r.get("paper_model")), None)
  paper_head = f"paper ({paper_model})" if paper_model else "paper"
  header = ("task", "metric", "ours", paper_head, "n", "skipped")
  lines = [header]
  for r in results:
    paper = _cell(r["paper_score"]) + (f" [{r['paper_note']}]" if r["paper_note"] and
                                       r["paper_score"] is not None else "")
    lines.append((r["task"], r["metric"], _cell(r["score"]), paper, str(r["evaluated"]),
                  str(r["skipped"])))
  for name in missing:
    lines.append((name, "-", "no data", "-", "0", "-"))
  if average is not None:
    label = "11-benchmark average" + ("" if average["complete"] else
                                      f" (partial: {average['tasks']}/11 tasks)")
    paper_avg = tasks_lib.PAPER_AVERAGE.get(paper_model) if average["complete"] else None
    lines.append((label, "", _cell(average["score"]), _cell(paper_avg), "", ""))
  widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
  text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
  text.insert(1, "  ".join("-" * w for w in widths))
  notes = [f"warning: {r['task']}: {r['skipped']} examples skipped ({r['skip_reasons']}); "
           f"the score covers the other {r['evaluated']}" for r in results if r["skipped"]]
  notes += [f"note: {r['task']}: {r['evaluated'] - r['scored']} examples have no answers "
            f"(server-scored split); predictions are in the JSONL" for r in results
            if r["scored"] < r["evaluated"]]
  return "\n".join(text + notes)
