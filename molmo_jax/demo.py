"""The built-in demo: train a tiny Molmo from scratch on synthetic shapes, evaluate it, draw points.

    python -m molmo_jax.demo --workdir outputs/demo          # `make demo`

Steps (all on the CPU, nothing downloaded):
  1. build the demo tokenizer and save it beside the run;
  2. train the recipe `configs/demo.py` (checkpoints in <workdir>/train, resumable: rerun the same
     command), keeping a checkpoint at each of `--curve-evals` evenly spaced steps;
  3. export the final parameters as a model directory (<workdir>/model) that `eval.py` and
     `python -m molmo_jax.predict` read;
  4. evaluate counting accuracy and pointing F1 on held-out synthetic scenes with the `eval.py`
     runner, next to chance level and next to an ablation whose image features are zeroed (proof
     that the score comes from vision);
  5. score the checkpoints kept during training on the first `--curve-examples` held-out scenes
     (same runner) and draw the learning curve (<workdir>/learning_curve.png: training loss,
     held-out counting accuracy and pointing F1 against steps);
  6. draw a contact sheet of held-out scenes with the question, the answer and the predicted
     (filled) and true (crosses) points (<workdir>/contact_sheet.png).
Everything measured goes to <workdir>/metrics.json.

Set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting Python (`make demo` does): training
runs noticeably faster on CPU (see docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from molmo_jax.progress import quiet_training_logs


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
  p.add_argument("--curve-evals", type=int, default=6,
                 help="checkpoints scored for the learning curve (evenly spaced; 0 = final only)")
  p.add_argument("--curve-examples", type=int, default=64, help="held-out scenes per task and checkpoint")
  p.add_argument("--sheet", type=int, default=16, help="held-out scenes on the contact sheet")
  p.add_argument("--skip-ablation", action="store_true")
  args = p.parse_args(argv)
  for name in ("eval_examples", "eval_batch", "curve_examples", "sheet"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
  if args.curve_evals < 0:
    p.error(f"--curve-evals: expected >= 0, got {args.curve_evals}")
  return args


def train_demo(config, workdir: Path):
  from molmo_jax.training import loop
  print(f"[demo] training {config.total_steps} steps, batch {config.data.global_batch_size}, "
        f"sequence {config.data.seq_len} -> {workdir / 'train'}", flush=True)
  start = time.time()
  result = loop.train(config, workdir / "train")
  elapsed = time.time() - start
  print(f"[demo] trained to step {result.step} in {elapsed:.0f} s "
        f"(loss {result.last_metrics.get('loss', float('nan')):.3f})", flush=True)
  return result, elapsed


def checkpoint_steps(workdir: Path) -> list[int]:
  root = workdir / "train" / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
  if not steps:
    raise RuntimeError(f"no training checkpoint under {root}")
  return steps


def restore_params(config, workdir: Path, step: int):
  from molmo_jax.models.molmo import abstract_params
  from molmo_jax.experiment import build_model_config
  from molmo_jax.model_dir import restore_params_only
  model_cfg = build_model_config(config.model)
  params = restore_params_only(workdir / "train" / "checkpoints" / str(step), abstract_params(model_cfg))
  return model_cfg, params


def export_model(config, workdir: Path, tokenizer_dir: Path) -> Path:
  """Final training checkpoint -> <workdir>/model (params, config.json, tokenizer/)."""
  from molmo_jax.model_dir import save_model_checkpoint
  step = checkpoint_steps(workdir)[-1]
  model_cfg, params = restore_params(config, workdir, step)
  out = save_model_checkpoint(workdir / "model", params, model_cfg, tokenizer_dir, overwrite=True)
  print(f"[demo] model directory (step {step}) -> {out}", flush=True)
  return out


def zero_image_features(params):
  """Ablation: the projector's output kernel at zero makes every image feature exactly 0."""
  import jax
  import jax.numpy as jnp
  params = jax.tree.map(lambda x: x, params)
  down = params["connector"]["projector"]["down"]
  params["connector"]["projector"]["down"] = dict(down, kernel=jnp.zeros_like(down["kernel"]))
  return params


def learning_curve(config, workdir: Path, tokenizer, args, scene_config) -> list[dict]:
  """Scores every checkpoint kept during training on the first `--curve-examples` scenes."""
  from molmo_jax.evals.synthetic_scores import score_scenes
  from molmo_jax.predictor import Predictor
  points = []
  for step in checkpoint_steps(workdir):
    start = time.time()
    model_cfg, params = restore_params(config, workdir, step)
    predictor = Predictor(model_cfg, params, tokenizer)
    scores = score_scenes(predictor, workdir / "curve" / f"step-{step}", "curve", args.curve_examples,
                          args.eval_batch, scene_config, quiet=True)
    points.append({"step": step, **{k: v for k, v in scores.items() if not isinstance(v, dict)}})
    print(f"[demo] curve: step {step:>5}  counting {scores['count_accuracy']:.3f}  pointing F1 "
          f"{scores['pointing_f1']:.3f}  F1 with objects {scores.get('pointing_f1_with_objects', float('nan')):.3f}"
          f"  ({args.curve_examples} scenes per task, {time.time() - start:.0f} s)", flush=True)
  return points


def training_losses(workdir: Path) -> tuple[list[int], list[float]]:
  """(steps, losses) from the training run's metrics.jsonl (the last record of a step wins)."""
  path = workdir / "train" / "metrics.jsonl"
  by_step: dict[int, float] = {}
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:       # a line cut short by a crash
        continue
      if "loss" in record and "step" in record:
        by_step[int(record["step"])] = float(record["loss"])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def draw_learning_curve(workdir: Path, curve: list[dict], chance: dict[str, float]) -> Path:
  from molmo_jax import plots
  steps, losses = training_losses(workdir)
  x = [p["step"] for p in curve]
  score = lambda key: [p.get(key, float("nan")) for p in curve]
  panels = [
      plots.Panel("training loss (answer tokens)", {"loss": (steps, losses)}),
      plots.Panel("held-out scenes", {
          "counting accuracy": (x, score("count_accuracy")),
          "pointing F1": (x, score("pointing_f1")),
          "F1, scenes with objects": (x, score("pointing_f1_with_objects"))}, y_range=(0.0, 1.0)),
  ]
  path = workdir / "learning_curve.png"
  plots.learning_curve(panels, path, title=f"demo run: loss and held-out scores (chance: counting "
                       f"{chance['count_accuracy']:.2f}, F1 with objects {chance['pointing_f1_with_objects']:.2f})")
  return path


def draw_contact_sheet(workdir: Path, count: int, scene_config) -> Path:
  """Held-out scenes from the final evaluation's predictions (half counting, half pointing)."""
  from molmo_jax import plots
  from molmo_jax.data.synthetic import SyntheticSource
  from molmo_jax.preprocess import points as points_lib
  tiles = []
  for task, n in (("count", (count + 1) // 2), ("points", count // 2)):
    path = workdir / "eval-model" / f"synthetic_{task}.predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()][:n]
    source = SyntheticSource(len(rows), seed=0, config=scene_config, task=task, split="eval")
    for row in rows:
      item = source[int(row["id"])]
      h, w = item["image"].shape[:2]
      predicted = points_lib.parse_points(row["prediction"], (w, h))
      scores = row.get("scores") or {}
      if task == "count":
        correct = bool(scores.get("correct"))
        verdict = f"count: {'right' if correct else 'wrong'} (true {row['targets']['count']})"
      else:
        f1 = float(scores.get("f1", 0.0))
        correct = f1 >= 0.999
        verdict = f"pointing F1 {f1:.2f} ({len(item['points'])} true)"
      tiles.append(plots.Tile(item["image"], item["messages"][0]["content"], row["prediction"],
                              predicted, item["points"], verdict, correct))
  path = workdir / "contact_sheet.png"
  plots.contact_sheet(tiles, path, title="held-out scenes: predicted points filled, true points crosses")
  return path


def main(argv=None) -> int:
  args = parse_args(argv)
  quiet_training_logs()
  workdir = Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  from molmo_jax import experiment
  from molmo_jax.data.demo_tokenizer import save_demo_tokenizer
  from molmo_jax.evals.synthetic_scores import chance_levels, recipe_scenes, score_scenes
  from molmo_jax.predictor import Predictor

  overrides = []
  if args.steps is not None:
    overrides.append(f"steps={args.steps}")
  if args.batch is not None:
    overrides.append(f"batch={args.batch}")
  recipe = args.recipe + (":" + ",".join(overrides) if overrides else "")
  config = experiment.load_recipe(recipe)
  # Keep the checkpoints the learning curve scores (evenly spaced, the last one is the final step).
  steps = int(config.total_steps)
  config.checkpoint.save_every = max(1, -(-steps // args.curve_evals)) if args.curve_evals else steps
  config.checkpoint.keep = 0
  config.log_every = max(1, min(int(config.log_every), steps // 20 or 1))
  try:
    scene_config = recipe_scenes(config)
  except ValueError as e:
    raise SystemExit(f"--recipe {args.recipe}: {e}; the demo needs one") from None
  tokenizer_dir = workdir / "tokenizer"
  save_demo_tokenizer(tokenizer_dir)
  config.tokenizer_dir = str(tokenizer_dir)

  started = time.time()
  _, train_s = train_demo(config, workdir)
  model_dir = export_model(config, workdir, tokenizer_dir)
  predictor = Predictor.from_checkpoint(model_dir)
  report = {"steps": steps, "batch": int(config.data.global_batch_size),
            "eval_examples": args.eval_examples, "train_time_s": round(train_s, 1)}
  report["model"] = score_scenes(predictor, workdir / "eval-model", "model", args.eval_examples,
                                 args.eval_batch, scene_config)
  report["chance"] = chance_levels(args.eval_examples, scene_config)
  if not args.skip_ablation:
    ablated = Predictor(predictor.config, zero_image_features(predictor.params), predictor.tokenizer)
    report["no_image_features"] = score_scenes(ablated, workdir / "eval-ablation", "ablation",
                                               args.eval_examples, args.eval_batch, scene_config)
  report["curve_examples"] = args.curve_examples
  report["curve"] = learning_curve(config, workdir, predictor.tokenizer, args, scene_config)
  loss_steps, losses = training_losses(workdir)
  report["train_loss"] = {"steps": loss_steps, "loss": [round(v, 5) for v in losses]}
  report["learning_curve"] = str(draw_learning_curve(workdir, report["curve"], report["chance"]))
  report["contact_sheet"] = str(draw_contact_sheet(workdir, args.sheet, scene_config))
  report["wall_time_s"] = round(time.time() - started, 1)
  (workdir / "metrics.json").write_text(json.dumps(report, indent=2))

  rows = [("model", report["model"]), ("chance", report["chance"])]
  if "no_image_features" in report:
    rows.append(("image features zeroed", report["no_image_features"]))
  print("\n  held-out synthetic scenes       counting accuracy   (2-3 objects)   pointing F1   "
        "F1, scenes with objects")
  for name, r in rows:
    print(f"  {name:<30}  {r['count_accuracy']:>17.3f}   {r.get('count_accuracy_2_or_more', float('nan')):>13.3f}"
          f"   {r['pointing_f1']:>11.3f}   {r.get('pointing_f1_with_objects', float('nan')):>23.3f}")
  print(f"\n  metrics: {workdir / 'metrics.json'}\n  contact sheet: {report['contact_sheet']}\n"
        f"  learning curve: {report['learning_curve']}\n  wall time {report['wall_time_s']:.0f} s "
        f"(training {train_s:.0f} s)")
  return 0


def run() -> None:
  """Console entry point (`molmo-demo`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
