"""Command line for benchmark evaluation (a thin layer over molmo_jax.evals.runner).

  python eval.py --checkpoint ckpt/molmo-7b-d --task chartqa --data data/chartqa --output out/
  python eval.py --checkpoint ckpt/molmo-7b-d --task all --data data/ --output out/

--task NAME     a registered task (molmo_jax.evals.tasks.TASKS), or `all` for the 11 academic benchmarks
                (then --data holds one subfolder per task: data/ai2d, data/chartqa, ...)
--data PATH     the dataset as downloaded (see docs/evaluation.md); not needed for synthetic_*
--limit N       only the first N rows (the number of examples for synthetic tasks)
--output DIR    predictions JSONL + metrics JSON per task; rerunning resumes where it stopped
--checkpoint    a model directory or a training workdir (its latest checkpoint, or --step N)

Generation is greedy, batched and data-parallel over every local device (the batch is rounded up to
a multiple of the device count). Crops and max_new_tokens default to the paper's per-task settings.
Prints a table of our score beside the paper's Table-1 number for the checkpoint's model.
An empty data file, or one whose examples are all skipped, is an error (exit 2) naming it; with
`all`, the task folders found and missing are listed (none found is an error).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from molmo_jax import errors


def parse_args(argv=None) -> argparse.Namespace:
  p = errors.ArgumentParser(prog="python eval.py", description=__doc__)
  p.add_argument("--checkpoint", required=True,
                 help="model directory, or a training workdir (latest checkpoint unless --step)")
  p.add_argument("--step", type=int, default=None,
                 help="training step to load when --checkpoint is a workdir (default: latest)")
  p.add_argument("--task", required=True, help="task name or 'all'")
  p.add_argument("--data", default=None, help="dataset path (a folder of task folders for 'all')")
  p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only "
                 "(default: all)")
  p.add_argument("--output", default=None, help="folder for predictions and metrics")
  p.add_argument("--batch-size", type=int, default=8, help="examples per generation call")
  p.add_argument("--max-crops", type=int, default=None, help="override the task's crop count")
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="stop generating after this many tokens (default: the task's setting)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute and parameter dtype (default: the checkpoint's config; the "
                      "reference evaluates in float32)")
  p.add_argument("--quantize", choices=["none", "int8", "int4", "int8+vit", "int4+vit"],
                 default="none", help="weight-only quantization of the language model (+vit: and "
                 "the vision tower) at load time (molmo_jax.quantize)")
  p.add_argument("--resize-method", choices=["tensorflow", "torchvision"], default=None,
                 help="image resize: tensorflow (what converted release checkpoints use, as the HF "
                      "processor) or torchvision (the native repo's default); default: the "
                      "checkpoint's config (see docs/fidelity.md)")
  p.add_argument("--paper-model", default=None,
                 help="Table-1 row to compare with (default: the checkpoint's config name)")
  p.add_argument("--seed", type=int, default=0, help="synthetic tasks: the data seed")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--json", action="store_true",
                 help="print JSON on stdout instead of the table (which then goes to stderr)")
  p.add_argument("--plugins", default="molmo_jax.evals.synthetic_tasks",
                 help="comma-separated modules to import first; they register more tasks "
                      "(default: the demo's synthetic_count / synthetic_points)")
  args = p.parse_args(argv)
  for name in ("limit", "batch_size", "max_crops", "max_new_tokens"):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')}: expected >= 1, got {value}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from molmo_jax.evals import runner, tasks
  from molmo_jax.evals.readers import DataError
  from molmo_jax.registry import import_plugins

  try:
    import_plugins(args.plugins, "--plugins")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  names = list(tasks.ACADEMIC_TASKS) if args.task == "all" else [args.task]
  try:
    for name in names:
      tasks.get_task(name)
    if args.task == "all" and args.data is None:
      raise DataError("--task all needs --data: a folder with one subfolder per task")
  except (ValueError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import jax
  from molmo_jax import sharding
  from molmo_jax.predictor import Predictor
  mesh = sharding.make_mesh(data=-1)
  predictor = Predictor.from_checkpoint(args.checkpoint, dtype=args.dtype, mesh=mesh, step=args.step,
                                        resize_method=args.resize_method,
                                        quantize=args.quantize)
  print(f"{args.checkpoint}: {predictor.config.name}, data-parallel over {len(jax.devices())} "
        f"device(s)", file=sys.stderr)
  options = dict(limit=args.limit, output_dir=args.output, batch_size=args.batch_size,
                 max_crops=args.max_crops, max_new_tokens=args.max_new_tokens,
                 progress=not args.no_progress, paper_model=args.paper_model)
  try:
    if args.task == "all":
      suite = runner.evaluate_suite(predictor, args.data, **options)
      results, average, missing = suite["results"], suite["average"], suite["missing"]
      if args.output:
        from pathlib import Path
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "summary.json").write_text(json.dumps(suite, indent=2) + "\n")
    else:
      task_options = {"seed": args.seed} if "seed" in tasks.get_task(args.task).options else None
      results = [runner.evaluate(predictor, args.task, data=args.data, task_options=task_options,
                                 **options)]
      average, missing = None, []
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = runner.format_summary(results, average, missing)
  if args.json:
    print(table, file=sys.stderr)
    print(json.dumps(results if average is None else {"results": results, "average": average},
                     indent=2))
  else:
    print(table)
  return 0


def run() -> None:
  """Console entry point (`molmo-eval`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
