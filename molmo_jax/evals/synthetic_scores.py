"""Held-out scoring on synthetic scenes, as the demo reports it: counting accuracy (overall, per
true count, on scenes with 2 or more objects), pointing F1 (overall, on scenes with and without
the asked-for kind), and the chance levels of the same scenes.

Used by `python -m molmo_jax.demo` and the benchmarks that score a demo-trained model
(benchmarks/quantize.py --scores, benchmarks/lora_new_kind.py). The numbers come from the
`eval.py` runner (`molmo_jax.evals.runner.evaluate`) on the `synthetic_count` /
`synthetic_points` tasks.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from molmo_jax.data.synthetic import SyntheticConfig, SyntheticSource
from molmo_jax.evals import synthetic_tasks  # noqa: F401 (registers synthetic_count / _points)
from molmo_jax.evals.metrics import pointing_metrics
from molmo_jax.evals.runner import evaluate


def recipe_scenes(config: Any) -> SyntheticConfig:
  """The SyntheticConfig of a recipe's first 'synthetic' data source (ValueError without one)."""
  scenes = [dict(s.get("options", {}).get("config", {})) for s in config.data.sources.values()
            if s.get("kind") == "synthetic"]
  if not scenes:
    raise ValueError("the recipe has no 'synthetic' data source")
  return SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in scenes[0].items()})


def chance_levels(num_examples: int, scene_config: SyntheticConfig) -> dict[str, float]:
  """Counting: always answering the most frequent true count. Pointing: as many uniformly random
  points as there are true objects (a generous baseline: it knows the count)."""
  counts = SyntheticSource(num_examples, seed=0, config=scene_config, task="count", split="eval")
  truth = [counts[i]["count"] for i in range(len(counts))]
  majority = max(set(truth), key=truth.count)
  points = SyntheticSource(num_examples, seed=0, config=scene_config, task="points", split="eval")
  rng = np.random.default_rng(0)
  f1, with_objects = [], []
  for i in range(len(points)):
    item = points[i]
    h, w = item["image"].shape[:2]
    k = len(item["points"])
    guess = rng.uniform([0, 0], [w, h], size=(k, 2)) if k else np.zeros((0, 2))
    text = "".join(f'<point x="{100 * x / w:.1f}" y="{100 * y / h:.1f}" alt="a">a</point>' for x, y in guess)
    if not k:
      text = "There are none."
    f1.append(pointing_metrics(text, item["points"], item["masks"], (w, h))["f1"])
    if k:
      with_objects.append(f1[-1])
  several = [t == majority for t in truth if t >= 2]
  return {"count_accuracy": float(np.mean([t == majority for t in truth])),
          "count_accuracy_2_or_more": float(np.mean(several)) if several else float("nan"),
          "pointing_f1": float(np.mean(f1)),
          "pointing_f1_with_objects": float(np.mean(with_objects)) if with_objects else float("nan")}


def score_scenes(predictor, out_dir: Path, tag: str, limit: int, batch_size: int,
                 scene_config: SyntheticConfig, quiet: bool = False) -> dict[str, float]:
  """Counting accuracy and pointing F1 (overall, on scenes with / without the asked-for kind,
  counting accuracy per true count) with the `eval.py` runner; predictions go to `out_dir`."""
  out = {}
  # Each call scores a new model; the runner refuses to resume another model's predictions, so
  # the evaluation folders start afresh.
  shutil.rmtree(out_dir, ignore_errors=True)
  for task, key, metric in (("synthetic_count", "count_accuracy", "correct"),
                            ("synthetic_points", "pointing_f1", "f1")):
    start = time.time()
    metrics = evaluate(predictor, task, limit=limit, output_dir=out_dir, batch_size=batch_size,
                       task_options={"config": scene_config}, progress=sys.stderr.isatty())
    out[key] = float(metrics[metric])
    if not quiet:
      print(f"[demo] {tag:>8} {task}: {metric} = {out[key]:.3f} ({time.time() - start:.0f} s)", flush=True)
    for extra in ("f1_with_objects", "f1_without_objects"):
      if extra in metrics:
        out[f"pointing_{extra}"] = float(metrics[extra])
    per_count = {k.removeprefix("correct_"): float(v) for k, v in metrics.items()
                 if k.startswith("correct_") and k.removeprefix("correct_").isdigit()}
    if per_count:
      out["count_accuracy_per_count"] = per_count
  rows = [json.loads(line) for line in (out_dir / "synthetic_count.predictions.jsonl").read_text().splitlines()]
  several = [r["scores"]["correct"] for r in rows if r.get("scores") and r["targets"]["count"] >= 2]
  if several:
    out["count_accuracy_2_or_more"] = float(np.mean(several))
  return out
