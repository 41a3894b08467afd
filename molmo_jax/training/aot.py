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
import numpy as np

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
  trainable_param_count: int = 0
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
      trainable_param_count=int(sum(np.prod(p.shape) for p, label in zip(
          jax.tree.leaves(exp.abstract_state.params), jax.tree.leaves(exp.optimizer.labels))
          if label != "frozen")),
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


# ------------------------------------------------------------------------------------------
# Generation (serving) step
# ------------------------------------------------------------------------------------------

def _merged_spec(float_shape: tuple[int, ...], spec: tuple, shape: tuple[int, ...]) -> tuple:
  """PartitionSpec of a row-major merge of `float_shape` into `shape` (qwix keeps a kernel in its
  2-D compute shape): each merged dim takes the first mesh axis of the dims it merges (splitting
  the outer dim in blocks is the same layout as splitting the merged one)."""
  out, i = [], 0
  for size in shape:
    group, prod = [], 1
    while i < len(float_shape) and (prod < size or (size == 1 and not group)):
      group.append(i)
      prod *= float_shape[i]
      i += 1
    if prod != size:
      raise ValueError(f"cannot map shape {float_shape} onto {shape}")
    axes = [spec[g] for g in group if spec[g] is not None]
    out.append(axes[0] if axes else None)
  return tuple(out)


def _quantized_shardings(abstract: Any, float_shardings: Any, mesh, float_abstract: Any) -> Any:
  """Shardings of a (possibly qwix-quantized) parameter tree from the float tree's shardings.

  A quantized weight's values share the float kernel's sharding; its per-channel scale keeps the
  kernel's rank with size-1 axes where the kernel was reduced, and those axes are not split.
  """
  import flax
  from jax.sharding import NamedSharding, PartitionSpec
  from molmo_jax import quantize as quantize_lib
  flat_sh = flax.traverse_util.flatten_dict(float_shardings)
  flat_float = flax.traverse_util.flatten_dict(float_abstract)
  flat = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: quantize_lib._is_with_aux(x))
  out = {}
  for path, leaf in flat.items():
    sharding = flat_sh[path]
    if not quantize_lib._is_with_aux(leaf):
      out[path] = sharding
      continue
    float_shape = flat_float[path].shape
    spec = tuple(sharding.spec) + (None,) * (len(float_shape) - len(sharding.spec))
    merged = _merged_spec(float_shape, spec, tuple(leaf.shape))

    def for_array(x, merged=merged):
      kept = tuple(s if dim != 1 or full == 1 else None
                   for s, dim, full in zip(merged, x.shape, leaf.shape))
      return NamedSharding(mesh, PartitionSpec(*kept))

    out[path] = jax.tree.map(for_array, leaf)
  return flax.traverse_util.unflatten_dict(out)


def compile_generation_step(model_cfg: Any, topology: str, batch_size: int, prompt_length: int,
                            quantize: str = "int8", dtype: str = "bfloat16",
                            mesh_shape: Mapping[str, int] | None = None, crops: int | None = None,
                            prefill_rows_per_pass: int = 0) -> CompileReport:
  """Compiles generation as Predictor runs it, for `topology`: the prefill of a batch of
  `prompt_length`-token prompts (with images of `crops` crops, default max_crops + 1) into a
  KV cache, then one decode step, with the weights in `dtype` or quantized (`quantize`).

  mesh_shape: default all chips on the tensor axis (weights, KV cache and attention heads split;
  the batch replicated), the layout for a batch too small to split over 8 chips.
  """
  import functools
  import jax.numpy as jnp
  import flax.linen as nn
  from molmo_jax import quantize as quantize_lib
  from molmo_jax.generate import SamplingConfig, _generate
  from molmo_jax.models.molmo import Molmo, abstract_variables, example_batch_shapes

  generation, chips = parse_topology(topology)
  devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(devices=devices, **dict(mesh_shape or {"data": 1, "tensor": -1}))
  config = model_cfg.replace(dtype=dtype, param_dtype=dtype)
  qcfg = quantize_lib.from_mapping(quantize)
  model = quantize_lib.quantized_model(Molmo(config), qcfg)
  boxed = abstract_variables(config)["params"]
  float_sh = sharding_lib.param_shardings(boxed, mesh)
  if qcfg.enabled:
    abstract = quantize_lib.abstract_quantized_params(model)
    shardings = _quantized_shardings(abstract, float_sh, mesh, nn.unbox(boxed))
  else:
    abstract, shardings = nn.unbox(boxed), float_sh
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  crops = crops or config.preprocess.max_crops + 1
  spec = example_batch_shapes(config, batch_size, prompt_length, crops)
  spec["position_ids"] = jax.ShapeDtypeStruct((batch_size, prompt_length), jnp.int32)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.data_sharding(mesh, v.ndim))
           for k, v in spec.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
  fn = jax.jit(functools.partial(_generate, model=model, sampling=SamplingConfig(max_new_tokens=1),
                                 prefill_rows_per_pass=prefill_rows_per_pass))
  report = CompileReport(
      topology=topology, chips=chips, mesh={k: int(v) for k, v in mesh.shape.items()}, fits=False,
      hbm_per_chip_bytes=HBM_BYTES[generation],
      param_count=int(sum(np.prod(p.shape) for p in jax.tree.leaves(nn.unbox(boxed)))),
      param_sharding=sharding_lib.describe(float_sh))
  start = time.time()
  try:
    with sharding_lib.activate(mesh):
      compiled = fn.lower(params, batch, rng).compile()
  except Exception as e:
    report.compile_seconds = time.time() - start
    message = str(e)
    if "RESOURCE_EXHAUSTED" in message or "exceeds" in message.lower():
      report.error = _first_lines(message)
      return report
    raise
  report.compile_seconds = time.time() - start
  for key, value in _memory(compiled).items():
    setattr(report, key, value)
  report.fits = report.total_bytes <= report.hbm_per_chip_bytes
  return report
