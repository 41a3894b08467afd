"""Compile the real train step for a TPU topology on a machine without TPUs (ahead of time).

libtpu (the `tpu` extra) can describe a TPU slice (`jax.experimental.topologies`) and compile for
its virtual devices from any host, the default JAX backend staying the CPU. We build the mesh from
those devices, `eval_shape` the train state with its shardings, and lower + compile exactly the
step `train.py` runs (same shardings, donation, remat policy, micro-batches). The memory figures
come from the compiled executable (`memory_analysis`), not from estimates; an XLA out-of-memory
error is reported as "does not fit".

Legend: chips = devices of the slice; HBM = per-chip high-bandwidth memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Mapping

import jax

from molmo_jax import sharding as sharding_lib
from molmo_jax.errors import UserError

GiB = 1024 ** 3
# Per-chip HBM in bytes (public spec sheets); the compiler's own limit is reported when it fails.
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass
class CompileReport:
  topology: str
  chips: int
  mesh: dict[str, int]
  fits: bool
  error: str | None = None
  hbm_per_chip_bytes: int = 0
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  generated_code_bytes: int = 0
  total_bytes: int = 0
  compile_seconds: float = 0.0
  model_flops_per_step: float = 0.0
  compiled_flops_per_step: float | None = None
  param_count: int = 0
  param_sharding: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def hbm_fraction(self) -> float:
    return self.total_bytes / self.hbm_per_chip_bytes if self.hbm_per_chip_bytes else float("nan")

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["hbm_fraction"] = self.hbm_fraction
    return d


def parse_topology(name: str) -> tuple[str, int]:
  """'v5p:8x8x4' -> ('v5p', 256). Raises on names libtpu would not understand."""
  m = _TOPOLOGY.match(name)
  if not m:
    raise ValueError(f"--topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                     f"{sorted(HBM_BYTES)}, e.g. v5p:4x4x4 or v6e:16x16")
  return m.group(1), math.prod(int(x) for x in m.group(2).split("x"))


def topology_devices(name: str) -> list:
  """Virtual devices of a TPU slice (needs libtpu; JAX stays on its default backend)."""
  parse_topology(name)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")       # quiets libtpu's host probing
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only use touches no chip; without this a second process (a test's subprocess, a
  # parallel planner run) fails on libtpu's single-user lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - jax always ships it
    raise RuntimeError(f"jax.experimental.topologies unavailable: {e}") from None
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # noqa: BLE001 - any failure here means no usable libtpu
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"--topology {name}", f"cannot describe this TPU slice ({reason})",
                    "is libtpu installed? pip install -e '.[tpu]'") from None
  return list(topo.devices)


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  get = lambda name: int(getattr(stats, name, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  # Donated state is both argument and output; XLA reports the shared part as aliased.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["generated_code_bytes"])
  return out


def compile_train_step(config: Any, topology: str, mesh_shape: Mapping[str, int] | None = None
                       ) -> CompileReport:
  """Lowers and compiles the train step that `config` describes for `topology` (mesh_shape:
  overrides config.mesh), built by `molmo_jax.experiment.build` as training builds it."""
  from molmo_jax import experiment as experiment_lib

  generation, chips = parse_topology(topology)
  devices = topology_devices(topology)
  exp = experiment_lib.build(config, devices=devices, mesh_shape=mesh_shape)
  abstract, batch = exp.abstract_state, exp.abstract_batch()
  report = CompileReport(
      topology=topology, chips=chips, mesh={k: int(v) for k, v in exp.mesh.shape.items()},
      fits=False, hbm_per_chip_bytes=HBM_BYTES[generation],
      model_flops_per_step=exp.step_flops(), param_count=exp.param_count(),
      param_sharding=sharding_lib.describe(exp.state_shardings.params))
  start = time.time()
  try:
    with sharding_lib.activate(exp.mesh):
      lowered = exp.train_step.jitted.lower(abstract, batch)
      compiled = lowered.compile()
  except Exception as e:  # XLA reports OOM as RESOURCE_EXHAUSTED at compile time
    report.compile_seconds = time.time() - start
    message = str(e)
    if "RESOURCE_EXHAUSTED" in message or "exceeds" in message.lower():
      report.error = _first_lines(message)
      return report
    raise
  report.compile_seconds = time.time() - start
  for key, value in _memory(compiled).items():
    setattr(report, key, value)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  # Counts a scanned body once; printed for reference only (see FACTS: not the step's FLOPs).
  report.compiled_flops_per_step = float(cost.get("flops", 0.0)) if cost else None
  report.fits = report.total_bytes <= report.hbm_per_chip_bytes
  return report


def _first_lines(text: str, n: int = 4) -> str:
  return "\n".join(line for line in text.strip().splitlines()[:n])


def format_report(r: CompileReport) -> str:
  gib = lambda b: f"{b / GiB:8.2f} GiB"
  lines = [f"topology {r.topology}: {r.chips} chips, mesh {r.mesh}, {r.param_count:,} parameters",
           f"  compile time            {r.compile_seconds:8.1f} s"]
  if r.error:
    lines.append(f"  DOES NOT FIT: {r.error}")
    return "\n".join(lines)
  lines += [f"  per-chip arguments     {gib(r.argument_bytes)}",
            f"  per-chip outputs       {gib(r.output_bytes)}  (aliased with donated args: {gib(r.alias_bytes)})",
            f"  per-chip temporaries   {gib(r.temp_bytes)}",
            f"  per-chip total         {gib(r.total_bytes)}  of {gib(r.hbm_per_chip_bytes)} HBM "
            f"({100 * r.hbm_fraction:.1f} %) -> {'fits' if r.fits else 'DOES NOT FIT'}",
            f"  model FLOPs / step     {r.model_flops_per_step:.3e} (analytic)",
            f"  compiled FLOPs / step  {r.compiled_flops_per_step or 0:.3e} (XLA, scanned body counted once)"]
  return "\n".join(lines)


def sharding_by_logical_axis(report: CompileReport) -> dict[str, list[str]]:
  """PartitionSpec -> parameter paths, for the printed sharding summary."""
  groups: dict[str, list[str]] = {}
  for path, spec in report.param_sharding.items():
    groups.setdefault(spec, []).append(path)
  return groups
