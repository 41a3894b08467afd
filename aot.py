"""Compile the real train step for a TPU slice on this (TPU-less) machine and report per-chip memory.

  python aot.py --config configs/finetune_multitask.py:molmo-72b --topology v5p:8x8x4 \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...] [--json report.json]

  python aot.py --generate --model molmo-72b --topology v5e:2x4 --batch 16 --length 4096 \
      --quantize int8 [--prefill-rows 2] [--crops 13] [--mesh tensor=8] [--json report.json]

The first form compiles the train step of a training config (with --config.lora.rank=64 ... a
LoRA step); --generate compiles generation as the Predictor runs it (prefill of `--batch` prompts
of `--length` tokens into the KV cache, then one decode step) with weight-only int8/int4 or
bfloat16 weights.
Needs libtpu (`pip install -e '.[tpu]'`); JAX itself stays on the CPU. Prints the mesh, per-chip
memory from the compiled executable (arguments, outputs, temporaries, total vs HBM), the analytic
model FLOPs per step and the parameter sharding per PartitionSpec. Exit status 0 when the step
fits, 3 when XLA reports it does not fit in HBM, 2 for usage errors (libtpu missing included).
"""

from __future__ import annotations

import json
import sys

from molmo_jax import errors


def main(argv=None) -> int:
  import train as train_cli
  from molmo_jax.training import aot

  p = errors.ArgumentParser(prog="python aot.py", description=__doc__)
  p.add_argument("--config", default=None, help="config file[:arg] as for train.py")
  p.add_argument("--topology", required=True, help="e.g. v5p:8x8x4, v6e:16x16, v4:4x4x4, v5e:8x8")
  p.add_argument("--json", default=None, help="write the report as JSON here")
  p.add_argument("--show-sharding", action="store_true", help="list every parameter's sharding")
  g = p.add_argument_group("generation (--generate)")
  g.add_argument("--generate", action="store_true", help="compile generation, not training")
  g.add_argument("--model", default=None, help="preset name (molmo-72b, ...) or a model directory")
  g.add_argument("--batch", type=int, default=16, help="prompts per batch")
  g.add_argument("--length", type=int, default=4096, help="prompt tokens (the KV cache holds +1)")
  g.add_argument("--crops", type=int, default=None, help="image crops per prompt (default max_crops+1)")
  g.add_argument("--quantize", default="int8", help="none | int8 | int4 | int8+vit | int4+vit")
  g.add_argument("--dtype", default="bfloat16", help="weight / compute dtype of what is not quantized")
  g.add_argument("--prefill-rows", type=int, default=0, help="prefill this many rows per pass (0 = all)")
  g.add_argument("--mesh", default="tensor=-1", help="mesh axes, e.g. tensor=8 or data=2,tensor=4")
  args, overrides = p.parse_known_args(argv)
  if args.generate:
    return _generate_main(args, overrides, aot)
  if not args.config:
    p.error("--config is required (or --generate --model NAME)")
  try:
    config = train_cli.load_config_file(args.config)
    for item in overrides:
      if not item.startswith("--config.") or "=" not in item:
        raise train_cli.UsageError(f"unexpected argument {item!r}; overrides look like --config.a.b=VALUE")
      key, _, value = item[len("--config."):].partition("=")
      train_cli.apply_override(config, key, value)
    aot.parse_topology(args.topology)
    if args.json:
      errors.writable_output(args.json, "--json")
  except (train_cli.UsageError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  report = aot.compile_train_step(config, args.topology)
  print(aot.format_report(report))
  groups = aot.sharding_by_logical_axis(report)
  print("  parameter sharding (PartitionSpec: parameters)")
  for spec, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    shown = paths if args.show_sharding else paths[:3] + (["..."] if len(paths) > 3 else [])
    print(f"    {spec}: {len(paths)} -> {', '.join(shown)}")
  if args.json:
    with open(args.json, "w") as f:   # its folder was checked before compiling
      json.dump(report.to_json(), f, indent=2)
  return 0 if report.fits else errors.EXIT_DOES_NOT_FIT


def _generate_main(args, overrides, aot) -> int:
  from pathlib import Path
  from molmo_jax import config as config_lib
  try:
    if overrides:
      raise ValueError(f"unexpected argument(s) {overrides} with --generate")
    if not args.model:
      raise ValueError("--generate needs --model (a preset name or a model directory)")
    if Path(args.model, "config.json").is_file():
      model_cfg = config_lib.MolmoConfig.from_json(Path(args.model, "config.json").read_text())
    else:
      model_cfg = config_lib.preset(args.model)
    mesh = {}
    for item in args.mesh.split(","):
      key, sep, value = item.partition("=")
      if not sep or key not in ("data", "fsdp", "tensor", "expert"):
        raise ValueError(f"--mesh {args.mesh!r}: expected AXIS=SIZE[,AXIS=SIZE] with axes "
                         "data, fsdp, tensor, expert")
      mesh[key] = int(value)
    mesh.setdefault("data", 1)
    if args.batch < 1 or args.length < 1:
      raise ValueError("--batch and --length must be positive")
    aot.parse_topology(args.topology)
    if args.json:
      errors.writable_output(args.json, "--json")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  report = aot.compile_generation_step(model_cfg, args.topology, args.batch, args.length,
                                       quantize=args.quantize, dtype=args.dtype, mesh_shape=mesh,
                                       crops=args.crops, prefill_rows_per_pass=args.prefill_rows)
  print(f"generation: batch {args.batch} x {args.length} prompt tokens + 1 decode step, "
        f"weights {args.quantize} ({args.dtype} elsewhere), prefill {args.prefill_rows or args.batch} "
        f"row(s) per pass")
  print(aot.format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"kind": "generation", "model": model_cfg.name, "batch": args.batch,
                 "prompt_length": args.length, "quantize": args.quantize, "dtype": args.dtype,
                 "prefill_rows_per_pass": args.prefill_rows, **report.to_json()}, f, indent=2)
  return 0 if report.fits else errors.EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(errors.run_main(main))
