r"""Compile the real train step (or generation) for a TPU slice on this (TPU-less) machine and
report per-chip memory.

  python aot.py --config configs/finetune_multitask.py:molmo-72b --topology v5p:8x8x4 \
      [--config.mesh.fsdp=-1 --config.model.remat_policy=full ...] [--json > report.json]

  python aot.py --generate --model molmo-72b --topology v5e:2x4 --batch 16 --length 4096 \
      --quantize int8 [--prefill-rows 1] [--crops 13] [--mesh tensor=8] \
      [--param-layouts auto] [--json]

The first form compiles the train step of a training recipe exactly as train.py runs it (same
overrides; --config.lora.rank=64 ... gives a LoRA step). --generate compiles generation as the
Predictor runs it: the prefill of --batch prompts of --length tokens (with images) into the KV
cache, then one decode step, with weight-only int8/int4 or bfloat16 weights; --model is a preset
name or a model directory. Needs libtpu (`pip install -e '.[tpu]'`); JAX itself stays on the CPU.
Prints the mesh, per-chip memory from the compiled executable (arguments, outputs, temporaries,
total vs HBM), the analytic model FLOPs per step (training) and the parameter sharding per
PartitionSpec. Exit status 0 when the program fits, 3 when XLA reports it does not fit in HBM,
2 for usage errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from molmo_jax import config_cli, errors

FLAGS = flags.FlagValues()
CONFIG = config_cli.define_config(FLAGS, help_text="recipe file[:arg] whose get_config(arg) "
                                  "returns the run's ConfigDict; override fields with "
                                  "--config.<field>=value (not with --generate)")
TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice GENERATION:AxB[xC], e.g. v5p:8x8x4, "
                               "v6e:16x16, v4:4x4x4, v5e:8x8", flag_values=FLAGS)
JSON = flags.DEFINE_boolean("json", False, "print the report as JSON on stdout instead of text",
                            flag_values=FLAGS)
SHOW_SHARDING = flags.DEFINE_boolean("show-sharding", False, "list every parameter's sharding "
                                     "(default: three per PartitionSpec)", flag_values=FLAGS)
GENERATE = flags.DEFINE_boolean("generate", False, "compile generation (prefill + one decode "
                                "step), not a train step; needs --model", flag_values=FLAGS)
MODEL = flags.DEFINE_string("model", None, "--generate: a preset name (molmo-72b, ...) or a model "
                            "directory", flag_values=FLAGS)
BATCH = flags.DEFINE_integer("batch", 16, "--generate: prompts per batch", lower_bound=1,
                             flag_values=FLAGS)
LENGTH = flags.DEFINE_integer("length", 4096, "--generate: prompt tokens (the KV cache holds one "
                              "more)", lower_bound=1, flag_values=FLAGS)
CROPS = flags.DEFINE_integer("crops", None, "--generate: image crops per prompt (default: the "
                             "model's max_crops + 1)", lower_bound=1, flag_values=FLAGS)
QUANTIZE = flags.DEFINE_string("quantize", "int8", "--generate: none | int8 | int4 | int8+vit | "
                               "int4+vit (weight-only)", flag_values=FLAGS)
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "--generate: dtype of "
                          "the weights that are not quantized and of the computation",
                          flag_values=FLAGS)
PREFILL_ROWS = flags.DEFINE_integer("prefill-rows", 0, "--generate: prefill this many prompts "
                                    "per pass (0 = the whole batch at once)", lower_bound=0,
                                    flag_values=FLAGS)
PARAM_LAYOUTS = flags.DEFINE_enum("param-layouts", "default", ["default", "auto"],
                                  "--generate: default = the weights in XLA's default memory "
                                  "layout (as a plain device_put leaves them); auto = in the "
                                  "layouts the compiler picks (weights placed once in the "
                                  "executable's input formats)", flag_values=FLAGS)
MESH = flags.DEFINE_string("mesh", "tensor=-1", "--generate: mesh axes, e.g. tensor=8 or "
                           "data=2,tensor=4 (omitted axes are 1)", flag_values=FLAGS)

HOLDERS = [CONFIG, TOPOLOGY, JSON, SHOW_SHARDING, GENERATE, MODEL, BATCH, LENGTH, CROPS, QUANTIZE,
           DTYPE, PREFILL_ROWS, PARAM_LAYOUTS, MESH]


def _mesh_shape(spec: str) -> dict[str, int]:
  sizes = {"data": 1}
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    name, sep, value = part.partition("=")
    if not sep or name not in ("data", "fsdp", "tensor", "expert"):
      raise config_cli.UsageError(f"--mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE] with AXIS "
                                  "one of data, fsdp, tensor, expert")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise config_cli.UsageError(f"--mesh {spec!r}: the size of {name} must be an integer") from None
  return sizes


def _model_config(name: str):
  from molmo_jax import config as config_lib
  if Path(name, "config.json").is_file():
    return config_lib.MolmoConfig.from_json(Path(name, "config.json").read_text())
  try:
    return config_lib.preset(name)
  except (KeyError, ValueError) as e:
    raise config_cli.UsageError(f"--model {name!r}: neither a model directory (config.json) nor "
                                f"a preset ({e})") from None


def _print_report(aot, report, header: str | None = None) -> None:
  if header:
    print(header)
  print(aot.format_report(report))
  groups = aot.sharding_by_logical_axis(report)
  print("  parameter sharding (PartitionSpec: parameters)")
  for spec, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    shown = paths if SHOW_SHARDING.value else paths[:3] + (["..."] if len(paths) > 3 else [])
    print(f"    {spec}: {len(paths)} -> {', '.join(shown)}")


def _generate(aot) -> int:
  from molmo_jax import quantize as quantize_lib
  try:
    if CONFIG.value is not None:
      raise config_cli.UsageError("--generate takes --model, not --config")
    config_cli.require([MODEL])
    quantize_lib.from_mapping(QUANTIZE.value)
    mesh = _mesh_shape(MESH.value)
    model_cfg = _model_config(MODEL.value)
  except (config_cli.UsageError, ValueError) as e:
    print(f"error: aot.py: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  report = aot.compile_generation_step(model_cfg, TOPOLOGY.value, BATCH.value, LENGTH.value,
                                       quantize=QUANTIZE.value, dtype=DTYPE.value,
                                       mesh_shape=mesh, crops=CROPS.value,
                                       prefill_rows_per_pass=PREFILL_ROWS.value,
                                       param_layouts=PARAM_LAYOUTS.value)
  if JSON.value:
    print(json.dumps({"kind": "generation", "model": model_cfg.name, "batch": BATCH.value,
                      "prompt_length": LENGTH.value, "quantize": QUANTIZE.value,
                      "dtype": DTYPE.value, "prefill_rows_per_pass": PREFILL_ROWS.value,
                      "param_layouts": PARAM_LAYOUTS.value,
                      **report.to_json()}, indent=2))
  else:
    _print_report(aot, report, f"generation: batch {BATCH.value} x {LENGTH.value} prompt tokens "
                  f"+ 1 decode step, weights {QUANTIZE.value} ({DTYPE.value} elsewhere), prefill "
                  f"{PREFILL_ROWS.value or BATCH.value} row(s) per pass")
  return 0 if report.fits else errors.EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else ["aot.py", *argv]
  from molmo_jax.training import aot
  try:
    config_cli.parse(argv, "aot.py", __doc__, HOLDERS, FLAGS)
    config_cli.require([TOPOLOGY])
    aot.parse_topology(TOPOLOGY.value)
  except (config_cli.UsageError, ValueError) as e:
    print(f"error: aot.py: {e}", file=sys.stderr)
    return errors.EXIT_USAGE
  if GENERATE.value:
    return _generate(aot)
  try:
    config_cli.require([CONFIG])
  except config_cli.UsageError as e:
    print(f"error: aot.py: {e} (or --generate --model NAME)", file=sys.stderr)
    return errors.EXIT_USAGE
  report = aot.compile_train_step(CONFIG.value, TOPOLOGY.value)
  if JSON.value:
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.fits else errors.EXIT_DOES_NOT_FIT
  _print_report(aot, report)
  return 0 if report.fits else errors.EXIT_DOES_NOT_FIT


def run() -> None:
  """Console entry point (`molmo-aot`)."""
  sys.exit(errors.run_main(main, sys.argv[1:]))


if __name__ == "__main__":
  run()
