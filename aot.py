"""Compile the real train step for a TPU slice on this (TPU-less) machine and report per-chip memory.

  python aot.py --config configs/finetune_multitask.py:molmo-72b --topology v5p:8x8x4 \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...] [--json report.json]
      [--remat-sweep full,minimal,qkv_proj]

Needs libtpu (`pip install -e '.[tpu]'`); JAX itself stays on the CPU. Prints the mesh, per-chip
memory from the compiled executable (arguments, outputs, temporaries, total vs HBM) next to the
analytic floor (16 bytes of state per parameter / chips + the activations the remat policy
keeps), the collective bytes per step by kind parsed from the compiled HLO next to the FSDP
minimum, the analytic model FLOPs per step and the parameter sharding per PartitionSpec.
--remat-sweep compiles once per policy and ends with a table of them (the JSON is then a list).
Exit status 0 when the step fits, 3 when XLA reports it does not fit in HBM, 2 for usage errors
(libtpu missing included).
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
  p.add_argument("--remat-sweep", default="", help="comma-separated remat policies to compile "
                 "one after another (e.g. full,minimal,qkv_proj,dots_no_batch)")
  args, overrides = p.parse_known_args(argv)
  try:
    config = train_cli.load_config_file(args.config)
    for item in overrides:
      if not item.startswith("--config.") or "=" not in item:
        raise train_cli.UsageError(f"unexpected argument {item!r}; overrides look like --config.a.b=VALUE")
      key, _, value = item[len("--config."):].partition("=")
      train_cli.apply_override(config, key, value)
    aot.parse_topology(args.topology)
    policies = [x for x in args.remat_sweep.split(",") if x]
    from molmo_jax.models.layers import REMAT_POLICIES
    unknown = [x for x in policies if x != "none" and x not in REMAT_POLICIES]
    if unknown:
      raise ValueError(f"--remat-sweep: unknown policy {unknown}; expected none or one of "
                       f"{sorted(REMAT_POLICIES)}")
    if args.json:
      errors.writable_output(args.json, "--json")
  except (train_cli.UsageError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  if policies:
    return _sweep(config, args, policies)
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


def _sweep(config, args, policies) -> int:
  from molmo_jax.training import aot
  reports = []
  for policy in policies:
    config.model.remat_policy = policy
    report = aot.compile_train_step(config, args.topology)
    print(f"remat {policy}:")
    print(aot.format_report(report))
    reports.append(report)
  gib = lambda b: f"{b / aot.GiB:.1f} GiB" if b else "-"
  print("\n| remat policy | per-chip total | of HBM | analytic floor | fits |")
  print("|---|---|---|---|---|")
  for policy, r in zip(policies, reports):
    total = gib(r.total_bytes) if not r.error else "does not fit"
    frac = f"{100 * r.hbm_fraction:.1f} %" if not r.error else "-"
    print(f"| {policy} | {total} | {frac} | {gib((r.floor_bytes or {}).get('total'))} | "
          f"{'yes' if r.fits else 'no'} |")
  if args.json:
    with open(args.json, "w") as f:   # its folder was checked before compiling
      json.dump([r.to_json() for r in reports], f, indent=2)
  return 0 if any(r.fits for r in reports) else errors.EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(errors.run_main(main))
