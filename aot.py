"""Compile the real train step for a TPU slice on this (TPU-less) machine and report per-chip memory.

  python aot.py --config configs/finetune_multitask.py:molmo-72b --topology v5p:8x8x4 \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...] [--json report.json]

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
  p.add_argument("--config", required=True, help="config file[:arg] as for train.py")
  p.add_argument("--topology", required=True, help="e.g. v5p:8x8x4, v6e:16x16, v4:4x4x4, v5e:8x8")
  p.add_argument("--json", default=None, help="write the report as JSON here")
  p.add_argument("--show-sharding", action="store_true", help="list every parameter's sharding")
  args, overrides = p.parse_known_args(argv)
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


if __name__ == "__main__":
  sys.exit(errors.run_main(main))
