"""The built-in demo: train a tiny Molmo from scratch on synthetic shapes, evaluate it, draw points.

    python -m molmo_jax.demo --workdir outputs/demo          # `make demo`

Steps (all on the CPU, nothing downloaded):
  1. build the demo tokenizer and save it beside the run;
  2. train the recipe `configs/demo.py` (checkpoints in <workdir>/train, resumable: rerun the same
     command);
  3. export the final parameters as a model directory (<workdir>/model) that `eval.py` and
     `python -m molmo_jax.predict` read;
  4. evaluate counting accuracy and pointing F1 on held-out synthetic scenes, next to chance level
     and next to an ablation whose image features are zeroed (proof that the score comes from
     vision);
  5. draw predicted (and true) points on a few held-out images (<workdir>/points-*.png).
Everything measured goes to <workdir>/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m molmo_jax.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="outputs/demo", help="everything the demo writes")
  p.add_argument("--recipe", default="configs/demo.py",
                 help="the training recipe (a train.py --config file; its 'steps=N,batch=B' "
                      "argument comes from --steps / --batch)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
  p.add_argument("--batch", type=int, default=None, help="global batch size")
  p.add_argument("--eval-examples", type=int, default=200, help="held-out scenes per task")
  p.add_argument("--eval-batch", type=int, default=16)
  p.add_argument("--pictures", type=int, default=4, help="PNGs with drawn points")
  p.add_argument("--skip-ablation", action="store_true")
  return p.parse_args(argv)


def _quiet_logs() -> None:
  """Training progress (molmo_jax.train) at INFO; libraries and per-example data notes quiet."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                      force=True)
  for name in ("absl", "orbax", "jax", "grain", "molmo_jax.data"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def train_demo(config, workdir: Path):
  from molmo_jax.training import loop
  print(f"[demo] training {config.total_steps} steps, batch {config.data.global_batch_size}, "
        f"sequence {config.data.seq_len} -> {workdir / 'train'}", flush=True)
  start = time.time()
  result = loop.train(config, workdir / "train")
  print(f"[demo] trained to step {result.step} in {time.time() - start:.0f} s "
        f"(loss {result.last_metrics.get('loss', float('nan')):.3f})", flush=True)
  return result


def export_model(config, workdir: Path, tokenizer_dir: Path) -> Path:
  """Final training checkpoint -> <workdir>/model (params, config.json, tokenizer/)."""
  from molmo_jax.models.molmo import abstract_params
  from molmo_jax.experiment import build_model_config
  from molmo_jax.model_dir import restore_params_only, save_model_checkpoint
  model_cfg = build_model_config(config.model)
  steps = sorted(int(p.name) for p in (workdir / "train" / "checkpoints").iterdir() if p.name.isdigit())
  if not steps:
    raise RuntimeError(f"no training checkpoint under {workdir / 'train' / 'checkpoints'}")
  params = restore_params_only(workdir / "train" / "checkpoints" / str(steps[-1]),
                               abstract_params(model_cfg))
  out = save_model_checkpoint(workdir / "model", params, model_cfg, tokenizer_dir, overwrite=True)
  print(f"[demo] model directory (step {steps[-1]}) -> {out}", flush=True)
  return out


def zero_image_features(params):
  """Ablation: the projector's output kernel at zero makes every image feature exactly 0."""
  import jax
  import jax.numpy as jnp
  params = jax.tree.map(lambda x: x, params)
  down = params["connector"]["projector"]["down"]
  params["connector"]["projector"]["down"] = dict(down, kernel=jnp.zeros_like(down["kernel"]))
  return params


def chance_levels(num_examples: int, scene_config) -> dict[str, float]:
  """Counting: always answering the most frequent true count. Pointing: as many uniformly random
  points as there are true objects (a generous baseline: it knows the count)."""
  from molmo_jax.data.synthetic import SyntheticSource
  from molmo_jax.evals.metrics import pointing_metrics
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
  return {"count_accuracy": float(np.mean([t == majority for t in truth])), "pointing_f1": float(np.mean(f1)),
          "pointing_f1_with_objects": float(np.mean(with_objects)) if with_objects else float("nan")}


def evaluate_demo(predictor, workdir: Path, tag: str, args, scene_config) -> dict[str, float]:
  import shutil
  from molmo_jax.evals.runner import evaluate
  out = {}
  # Each run exports a new model; the runner refuses to resume another model's predictions, so
  # the demo starts its own evaluation folders afresh.
  shutil.rmtree(workdir / f"eval-{tag}", ignore_errors=True)
  for task, key, metric in (("synthetic_count", "count_accuracy", "correct"),
                            ("synthetic_points", "pointing_f1", "f1")):
    start = time.time()
    metrics = evaluate(predictor, task, limit=args.eval_examples, output_dir=workdir / f"eval-{tag}",
                       batch_size=args.eval_batch, task_options={"config": scene_config})
    out[key] = float(metrics[metric])
    print(f"[demo] {tag:>8} {task}: {metric} = {out[key]:.3f} ({time.time() - start:.0f} s)", flush=True)
    if "f1_with_objects" in metrics:
      out["pointing_f1_with_objects"] = float(metrics["f1_with_objects"])
  return out


def draw_examples(predictor, workdir: Path, count: int, scene_config) -> list[str]:
  from molmo_jax.data.synthetic import SyntheticSource
  from molmo_jax.preprocess import points as points_lib
  source = SyntheticSource(count, seed=0, config=scene_config, task="points", split="eval")
  items = [source[i] for i in range(count)]
  preds = predictor.predict([it["image"] for it in items], [it["messages"][0]["content"] for it in items])
  paths = []
  for i, (item, pred) in enumerate(zip(items, preds)):
    path = workdir / f"points-{i}.png"
    points_lib.draw_points(item["image"], pred.points, item["points"], out_path=path)
    paths.append(str(path))
    print(f"[demo] {path.name}: Q: {item['messages'][0]['content']!r}  A: {pred.text!r}", flush=True)
  return paths


def main(argv=None) -> int:
  args = parse_args(argv)
  _quiet_logs()
  workdir = Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  from molmo_jax import experiment
  from molmo_jax.data.demo_tokenizer import save_demo_tokenizer
  from molmo_jax.data.synthetic import SyntheticConfig
  from molmo_jax.evals import synthetic_tasks  # noqa: F401 (registers synthetic_count / _points)
  from molmo_jax.predictor import Predictor

  overrides = []
  if args.steps is not None:
    overrides.append(f"steps={args.steps}")
  if args.batch is not None:
    overrides.append(f"batch={args.batch}")
  recipe = args.recipe + (":" + ",".join(overrides) if overrides else "")
  config = experiment.load_recipe(recipe)
  scenes = [dict(s.get("options", {}).get("config", {})) for s in config.data.sources.values()
            if s.get("kind") == "synthetic"]
  if not scenes:
    raise SystemExit(f"--recipe {args.recipe}: the demo needs a 'synthetic' data source")
  scene_config = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in scenes[0].items()})
  tokenizer_dir = workdir / "tokenizer"
  save_demo_tokenizer(tokenizer_dir)
  config.tokenizer_dir = str(tokenizer_dir)

  started = time.time()
  train_demo(config, workdir)
  model_dir = export_model(config, workdir, tokenizer_dir)
  predictor = Predictor.from_checkpoint(model_dir)
  report = {"steps": int(config.total_steps), "batch": int(config.data.global_batch_size),
            "eval_examples": args.eval_examples}
  report["model"] = evaluate_demo(predictor, workdir, "model", args, scene_config)
  report["chance"] = chance_levels(args.eval_examples, scene_config)
  if not args.skip_ablation:
    ablated = Predictor(predictor.config, zero_image_features(predictor.params), predictor.tokenizer)
    report["no_image_features"] = evaluate_demo(ablated, workdir, "ablation", args, scene_config)
  report["pictures"] = draw_examples(predictor, workdir, args.pictures, scene_config)
  report["wall_time_s"] = round(time.time() - started, 1)
  (workdir / "metrics.json").write_text(json.dumps(report, indent=2))

  rows = [("model", report["model"]), ("chance", report["chance"])]
  if "no_image_features" in report:
    rows.append(("image features zeroed", report["no_image_features"]))
  print("\n  held-out synthetic scenes       counting accuracy   pointing F1   F1, scenes with objects")
  for name, r in rows:
    print(f"  {name:<30}  {r['count_accuracy']:>17.3f}   {r['pointing_f1']:>11.3f}   "
          f"{r.get('pointing_f1_with_objects', float('nan')):>23.3f}")
  print(f"\n  metrics: {workdir / 'metrics.json'}   pictures: {workdir}/points-*.png   "
        f"wall time {report['wall_time_s']:.0f} s")
  return 0


def run() -> None:
  """Console entry point (`molmo-demo`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
