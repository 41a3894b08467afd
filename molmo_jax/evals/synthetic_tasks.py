"""The demo's held-out synthetic tasks, registered in `molmo_jax.evals.tasks.TASKS` on import.

  synthetic_count    "How many <kind> are there?" on held-out scenes; metric: exact count
  synthetic_points   "Point to the <kind>." on held-out scenes; metric: pointing F1

The scenes come from `molmo_jax.data.synthetic.SyntheticSource(n, seed, config, split="eval")`,
built from `limit` and the task options {config: SyntheticConfig, seed: int} when no data is given.
eval.py imports this module (its `--plugins` default); library code never does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from molmo_jax.data.synthetic import SyntheticConfig, SyntheticSource
from molmo_jax.evals import metrics
from molmo_jax.evals.benchmarks import EvalExample, score_count
from molmo_jax.evals.readers import DataError
from molmo_jax.evals.tasks import (POINTING_TOKENS, ExampleStream, Task, counting_summary,
                                   pointing_summary, register_task)

DEFAULT_EXAMPLES = 64
OPTIONS = ("config", "seed")     # SyntheticConfig of the scenes, data seed
NAMES = ("synthetic_count", "synthetic_points")


def synthetic_example(item: dict, index: int) -> EvalExample:
  """An EvalExample from one SyntheticSource item."""
  question = item["messages"][0]["content"]
  targets = {"count": int(item["count"]), "label": item["label"],
             "points": np.asarray(item["points"]).round(2).tolist()}
  return EvalExample(str(index), item["image"], question, item["style"], targets,
                     {"masks": item["masks"], "points": item["points"]})


def score_synthetic_points(prediction: str, example: EvalExample, image_size) -> dict:
  return metrics.pointing_metrics(prediction, example.info["points"], list(example.info["masks"]),
                                  image_size)


def synthetic_loader(kind: str):
  """Held-out synthetic examples: `data` is a SyntheticSource (task `kind`, split "eval")."""
  def load(data: Any) -> ExampleStream:
    if not isinstance(data, SyntheticSource):
      raise DataError(f"synthetic_{kind}: data must be a SyntheticSource (the runner builds one "
                      f"from synthetic_config/seed/limit), got {type(data).__name__}")
    if data.task != kind or data.split != "eval":
      raise DataError(f"synthetic_{kind}: expected an eval-split SyntheticSource of task {kind!r}, "
                      f"got task={data.task!r} split={data.split!r}")
    items = (synthetic_example(data[i], i) for i in range(len(data)))
    return ExampleStream(items, len(data), repr(data))
  return load


def held_out_source(kind: str):
  """(limit, seed=0, config=None) -> the held-out SyntheticSource a synthetic task evaluates on."""
  def build(limit: int | None, seed: int = 0, config: SyntheticConfig | None = None) -> SyntheticSource:
    n = DEFAULT_EXAMPLES if limit is None else limit
    return SyntheticSource(n, seed, config or SyntheticConfig(), task=kind, split="eval")
  return build


register_task(Task(
    "synthetic_count", "synthetic counting (held-out)", "correct", None, POINTING_TOKENS,
    synthetic_loader("count"), score_count, summarize=counting_summary,
    data_help="built in: SyntheticSource(n, seed, config, task='count', split='eval')",
    options=OPTIONS, default_data=held_out_source("count")))
register_task(Task(
    "synthetic_points", "synthetic pointing (held-out)", "f1", None, POINTING_TOKENS,
    synthetic_loader("points"), score_synthetic_points, summarize=pointing_summary,
    data_help="built in: SyntheticSource(n, seed, config, task='points', split='eval')",
    options=OPTIONS, default_data=held_out_source("points")))
