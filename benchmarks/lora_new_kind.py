"""LoRA on the demo task: teach a demo-trained model a colour it has never seen.

    python benchmarks/lora_new_kind.py --base outputs/demo-pointing/model \
        [--recipe configs/demo_pointing.py] [--new-colour yellow] [--steps 400] [--batch 16] \
        [--rank 4] [--workdir outputs/lora-new-kind] [--eval-examples 100]

The base is a model directory trained by the demo (`python -m molmo_jax.demo`) with `--recipe`,
whose scenes never contain `--new-colour`. The run fine-tunes rank-`--rank` adapters on every
LLM and connector dense layer (`lora.targets = ("llm", "connector")`; nothing else trains) on the
recipe's scenes with the new colour added to the palette, with the recipe's learning rates and
only the language-modelling loss. It then scores, on held-out scenes that contain only the new
colour (so every question asks about the new kind):

  * the base model, the base + adapters (merged into a model directory by `molmo_jax.lora`) and
    the chance levels of the same scenes (`molmo_jax.evals.synthetic_scores`);
  * the same two models on the recipe's own scenes (what the adapters cost on the old kinds).

and the adapter directory's bytes against the base model's parameter bytes. Prints a table and
writes benchmarks/results/lora_new_kind.json (or --json PATH). The demo tokenizer already holds
every palette colour and shape, so no vocabulary changes. 400 steps take about 4 minutes on 2 CPU
cores, each evaluation about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "lora_new_kind.json"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="model directory trained by the demo with --recipe")
  p.add_argument("--recipe", default="configs/demo_pointing.py")
  p.add_argument("--new-colour", default="yellow")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--alpha", type=float, default=8.0)
  p.add_argument("--learning-rate", type=float, default=None,
                 help="adapters' learning rate (default: the recipe's LLM learning rate)")
  p.add_argument("--workdir", default="outputs/lora-new-kind")
  p.add_argument("--eval-examples", type=int, default=100, help="held-out scenes per task and scene set")
  p.add_argument("--json", default=str(RESULTS))
  return p.parse_args(argv)


def directory_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
  args = parse_args(argv)
  import dataclasses
  from molmo_jax import experiment
  from molmo_jax import lora as lora_lib
  from molmo_jax.data.synthetic import PALETTE
  from molmo_jax.evals.synthetic_scores import chance_levels, recipe_scenes, score_scenes
  from molmo_jax.predictor import Predictor
  from molmo_jax.progress import quiet_training_logs
  from molmo_jax.training import loop

  quiet_training_logs()
  base = Path(args.base).absolute()
  if not (base / "config.json").is_file():
    raise SystemExit(f"error: --base {args.base}: not a model directory (no config.json); train one "
                     "with python -m molmo_jax.demo --recipe ... first")
  if args.new_colour not in PALETTE:
    raise SystemExit(f"error: --new-colour: expected one of {sorted(PALETTE)}, got {args.new_colour!r}")
  config = experiment.load_recipe(f"{args.recipe}:steps={args.steps},batch={args.batch}")
  old_scenes = recipe_scenes(config)
  if args.new_colour in old_scenes.colours:
    raise SystemExit(f"error: --new-colour {args.new_colour}: the recipe's scenes already use it "
                     f"(colours {old_scenes.colours})")
  train_scenes = dataclasses.replace(old_scenes, colours=old_scenes.colours + (args.new_colour,))
  new_scenes = dataclasses.replace(old_scenes, colours=(args.new_colour,))

  workdir = Path(args.workdir).absolute()
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)
  config.init_from = str(base)
  config.tokenizer_dir = str(base / "tokenizer")
  config.data.sources.shapes.options.config.colours = train_scenes.colours
  config.lora.rank = args.rank
  config.lora.alpha = args.alpha
  config.lora.targets = ("llm", "connector")
  config.lora.train = ()
  if args.learning_rate is not None:
    for component in ("llm", "connector", "vit"):
      config.optimizer[component].learning_rate = args.learning_rate
  config.checkpoint.save_every = args.steps
  print(f"[lora] {args.steps} steps x {args.batch}, rank {args.rank}, colours {train_scenes.colours}",
        flush=True)
  start = time.time()
  result = loop.train(config, workdir / "train")
  train_s = time.time() - start
  adapters = workdir / "train" / "adapters"
  merged = lora_lib.merge_model_directory(base, adapters, workdir / "merged", overwrite=True)

  report = {"base": str(base), "recipe": args.recipe, "new_colour": args.new_colour, "steps": args.steps,
            "batch": args.batch, "rank": args.rank, "alpha": args.alpha,
            "targets": list(config.lora.targets), "train_time_s": round(train_s, 1),
            "final_loss": float(result.last_metrics.get("loss", float("nan"))),
            "adapter_bytes": directory_bytes(adapters),
            "base_param_bytes": directory_bytes(base / "params"),
            "eval_examples": args.eval_examples}
  report["adapter_fraction"] = report["adapter_bytes"] / report["base_param_bytes"]
  report["chance_new_kind"] = chance_levels(args.eval_examples, new_scenes)
  report["chance_old_kinds"] = chance_levels(args.eval_examples, old_scenes)
  for tag, model_dir in (("base", base), ("lora", merged)):
    predictor = Predictor.from_checkpoint(model_dir)
    for scenes_tag, scenes in (("new_kind", new_scenes), ("old_kinds", old_scenes)):
      report[f"{tag}_{scenes_tag}"] = score_scenes(
          predictor, workdir / f"eval-{tag}-{scenes_tag}", f"{tag}/{scenes_tag}",
          args.eval_examples, 16, scenes)

  out = Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  print(f"\n  LoRA rank {args.rank} on '{args.new_colour}' ({args.steps} x {args.batch} steps, "
        f"{train_s:.0f} s): adapters {report['adapter_bytes'] / 2**20:.2f} MiB = "
        f"{100 * report['adapter_fraction']:.2f} % of the base's {report['base_param_bytes'] / 2**20:.1f} MiB")
  print("  scenes               model   counting   (2-3 objects)   pointing F1   F1 with objects")
  for scenes_tag in ("new_kind", "old_kinds"):
    for tag in ("chance", "base", "lora"):
      r = report[f"{tag}_{scenes_tag}"]
      print(f"  {scenes_tag:<20} {tag:<6} {r['count_accuracy']:>9.3f}   "
            f"{r.get('count_accuracy_2_or_more', float('nan')):>13.3f}   {r['pointing_f1']:>11.3f}   "
            f"{r.get('pointing_f1_with_objects', float('nan')):>15.3f}")
  print(f"  wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
