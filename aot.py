r"""Compile the real train step for a TPU slice on this (TPU-less) machine and report per-chip memory.

  python aot.py --config configs/finetune_multitask.py:molmo-72b --topology v5p:8x8x4 \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...] [--json > report.json]

--config takes a training recipe exactly as train.py does (same overrides). Needs libtpu
(`pip install -e '.[tpu]'`); JAX itself stays on the CPU. Prints the mesh, per-chip memory from
the compiled executable (arguments, outputs, temporaries, total vs HBM), the analytic model FLOPs
per step and the parameter sharding per PartitionSpec. Exit status 0 when the step fits, 3 when
XLA reports it does not fit in HBM, 2 for usage errors.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from molmo_jax import config_cli, errors

FLAGS = flags.FlagValues()
CONFIG = config_cli.define_config(FLAGS)
TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice GENERATION:AxB[xC], e.g. v5p:8x8x4, "
                               "v6e:16x16, v4:4x4x4, v5e:8x8", flag_values=FLAGS)
JSON = flags.DEFINE_boolean("json", False, "print the report as JSON on stdout instead of text",
                            flag_values=FLAGS)
SHOW_SHARDING = flags.DEFINE_boolean("show-sharding", False, "list every parameter's sharding "
                                     "(default: three per PartitionSpec)", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else ["aot.py", *argv]
  from molmo_jax.training import aot
  try:
    config_cli.parse(argv, "aot.py", __doc__, [CONFIG, TOPOLOGY, JSON, SHOW_SHARDING], FLAGS)
    config_cli.require([CONFIG, TOPOLOGY])
    aot.parse_topology(TOPOLOGY.value)
  except (config_cli.UsageError, ValueError) as e:
    print(f"error: aot.py: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  report = aot.compile_train_step(CONFIG.value, TOPOLOGY.value)
  if JSON.value:
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.fits else errors.EXIT_DOES_NOT_FIT
  print(aot.format_report(report))
  groups = aot.sharding_by_logical_axis(report)
  print("  parameter sharding (PartitionSpec: parameters)")
  for spec, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    shown = paths if SHOW_SHARDING.value else paths[:3] + (["..."] if len(paths) > 3 else [])
    print(f"    {spec}: {len(paths)} -> {', '.join(shown)}")
  return 0 if report.fits else errors.EXIT_DOES_NOT_FIT


def run() -> None:
  """Console entry point (`molmo-aot`)."""
  sys.exit(errors.run_main(main, sys.argv[1:]))


if __name__ == "__main__":
  run()
