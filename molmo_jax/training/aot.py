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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
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
  # Pinned host memory per chip (offloaded optimizer state): host arguments + outputs - aliased
  # + host temporaries; not part of total_bytes, which is HBM.
  host_bytes: int = 0
  compile_seconds: float = 0.0
  model_flops_per_step: float = 0.0
  compiled_flops_per_step: float | None = None
  param_count: int = 0
  trainable_param_count: int = 0
  param_sharding: dict[str, str] = dataclasses.field(default_factory=dict)
  remat_policy: str = ""
  micro_batches: int = 1
  # Per chip: the analytic floor {"state", "activations", "total"} (activations None where the
  # remat policy is not modelled), collective bytes per step by kind from the compiled HLO, and
  # the FSDP minimum {"all-gather", "reduce-scatter"} (see `analytic_floor`, `collective_bytes`).
  floor_bytes: dict[str, float | None] = dataclasses.field(default_factory=dict)
  collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  fsdp_min_collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)

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
  out["host_bytes"] = (get("host_argument_size_in_bytes") + get("host_output_size_in_bytes")
                       - get("host_alias_size_in_bytes") + get("host_temp_size_in_bytes"))
  return out


def compile_train_step(config: Any, topology: str, mesh_shape: Mapping[str, int] | None = None,
                       keep_hlo: bool = False) -> CompileReport:
  """Lowers and compiles the train step that `config` describes for `topology` (mesh_shape:
  overrides config.mesh), built by `molmo_jax.experiment.build` as training builds it.

  keep_hlo: also keep the compiled HLO text in `report.hlo_text` (not written to JSON).
  """
  from molmo_jax import experiment as experiment_lib
  from molmo_jax.training import train_step as step_lib

  generation, chips = parse_topology(topology)
  devices = topology_devices(topology)
  exp = experiment_lib.build(config, devices=devices, mesh_shape=mesh_shape)
  abstract, batch = exp.abstract_state, exp.abstract_batch()
  model_cfg, step_cfg, spec = exp.model_config, exp.step_config, exp.batch_spec
  compute_bytes = jnp.dtype(model_cfg.dtype).itemsize
  rows = exp.data_config.global_batch_size // (step_cfg.micro_batches
                                               * step_lib.data_parallel_size(exp.mesh))
  kept = kept_activation_bytes(model_cfg, rows, exp.data_config.seq_len,
                               spec["images"].shape[1] if "images" in spec else 0,
                               model_cfg.remat_policy, compute_bytes)
  report = CompileReport(
      topology=topology, chips=chips, mesh={k: int(v) for k, v in exp.mesh.shape.items()},
      fits=False, hbm_per_chip_bytes=HBM_BYTES[generation],
      model_flops_per_step=exp.step_flops(), param_count=exp.param_count(),
      trainable_param_count=int(sum(np.prod(p.shape) for p, label in zip(
          jax.tree.leaves(exp.abstract_state.params), jax.tree.leaves(exp.optimizer.labels))
          if label != "frozen")),
      param_sharding=sharding_lib.describe(exp.state_shardings.params),
      remat_policy=model_cfg.remat_policy, micro_batches=step_cfg.micro_batches)
  report.floor_bytes = analytic_floor(report.param_count, chips, kept)
  report.fsdp_min_collective_bytes = fsdp_minimum_collectives(
      _gathered_elements(abstract.params, exp.state_shardings.params, exp.mesh), compute_bytes,
      step_cfg.micro_batches, model_cfg.remat_policy != "none")
  compiled = _compile_or_report(report, exp.mesh, lambda: exp.train_step.jitted.lower(abstract, batch))
  if compiled is None:
    return report
  hlo = compiled.as_text()
  if keep_hlo:
    report.hlo_text = hlo
  report.collective_bytes = collective_bytes(hlo)
  for key, value in _memory(compiled).items():
    setattr(report, key, value)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  # Counts a scanned body once; printed for reference only (see FACTS: not the step's FLOPs).
  report.compiled_flops_per_step = float(cost.get("flops", 0.0)) if cost else None
  report.fits = report.total_bytes <= report.hbm_per_chip_bytes
  return report


# ------------------------------------------------------------------------------------------
# Collectives in the compiled HLO
# ------------------------------------------------------------------------------------------

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s+(?:\(.*\))?.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> list[int]:
  """Bytes of every array in a shape string ('(bf16[4,8]{1,0}, f32[2])' -> [64, 8])."""
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    out.append(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
  return out


def _trip_count(condition: list[str]) -> float:
  """Iterations of a counted loop from its condition computation: `i < constant(N)` (lax.scan
  and fori_loop count from 0 in steps of 1). 1 when the pattern is not found."""
  constants = {}
  for line in condition:
    m = re.match(r"\s*%?([\w.\-]+)\s*=\s*s32\[\][^ ]*\s+constant\((-?\d+)\)", line)
    if m:
      constants[m.group(1)] = int(m.group(2))
  for line in condition:
    if "compare(" in line and "direction=LT" in line:
      operands = re.findall(r"%([\w.\-]+)", line.split("compare(", 1)[1].split(")")[0])
      if len(operands) == 2 and operands[1] in constants:
        return float(max(constants[operands[1]], 0))
  return 1.0


def collective_bytes(hlo_text: str) -> dict[str, float]:
  """Bytes moved per step by each kind of collective, from compiled HLO text (per device).

  Convention: the size of the full array on the collective's wide side, i.e. the result of an
  all-gather, the operand of a reduce-scatter, the operand of an all-reduce / all-to-all /
  collective-permute (ragged-all-to-all counts as all-to-all: its operand, the rows sent).
  Asynchronous pairs are counted once (the -start op). A collective inside a while loop
  (scanned layers, micro-batches) counts once per iteration (XLA's known_trip_count, else the
  `i < N` of the loop condition), nested loops multiply.
  """
  computations: dict[str, list[str]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    if current is None:
      # Computation headers start in column 0 ("%name (params) -> result {", "ENTRY %name ...").
      m = _COMPUTATION.match(line) if line[:1] in ("%", "E") and line.rstrip().endswith("{") else None
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    computations[current].append(line)
  if entry is None:
    return {k: 0.0 for k in COLLECTIVE_KINDS}
  shapes: dict[str, str] = {}
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        shapes[m.group(1)] = m.group(2)
  # How often each computation runs per step.
  runs: dict[str, float] = {entry: 1.0}
  order = [entry]
  for name in order:
    for line in computations.get(name, []):
      trip = 1.0
      if " while(" in line:
        t = _TRIP.search(line)
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        trip = float(t.group(1)) if t else _trip_count(computations.get(cond.group(1) if cond else "", []))
      for attr, targets in _CALLS.findall(line):
        for target in targets.strip("{}").replace("%", "").split(","):
          target = target.strip()
          if target not in computations:
            continue
          factor = trip if attr in ("body", "condition") else 1.0
          runs[target] = runs.get(target, 0.0) + runs[name] * factor
          if target not in order:
            order.append(target)
  totals = {k: 0.0 for k in COLLECTIVE_KINDS}
  for name, lines in computations.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      op = m.group(3)
      if op.endswith("-done"):
        continue
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base == "ragged-all-to-all":
        base = "all-to-all"
      if base not in totals:
        continue
      if base == "all-gather":      # result; an async start's result is (operands, results)
        sizes = _shape_bytes(m.group(2))
        size = sum(sizes[len(sizes) // 2:]) if op.endswith("-start") else sum(sizes)
      else:
        operands = re.findall(r"%([\w.\-]+)", m.group(4).split(")")[0])
        size = sum(sum(_shape_bytes(shapes.get(o, ""))) for o in operands)
        if base == "all-to-all" and op == "ragged-all-to-all":
          size = sum(_shape_bytes(shapes.get(operands[0], ""))) if operands else 0
        if not size:
          sizes = _shape_bytes(m.group(2))
          size = sizes[0] if sizes else 0
      totals[base] += size * runs.get(name, 0.0)
  return totals


# ------------------------------------------------------------------------------------------
# Analytic floors
# ------------------------------------------------------------------------------------------

STATE_BYTES_PER_PARAM = 16      # fp32 master weights 4 + gradients 4 + AdamW mu 4 + nu 4


def kept_activation_bytes(model_cfg: Any, rows: int, seq_len: int, crops: int, policy: str,
                          compute_bytes: int) -> float | None:
  """Bytes the remat policy keeps for the backward pass, per chip and micro-batch, for `rows`
  examples: the scanned blocks' inputs (LLM [rows, T, D], ViT [rows*crops, P, Dv]) plus what the
  policy saves inside a block. None for policies whose residuals are not modelled (none, dots,
  dots_no_batch: XLA decides)."""
  llm, vit = model_cfg.llm, model_cfg.vision
  tokens = rows * seq_len
  patches = rows * crops * vit.num_patches
  base = llm.num_layers * tokens * llm.d_model + vit.num_layers * patches * vit.width
  qkv = (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
  hidden = llm.experts_per_token * llm.expert_mlp_dim if llm.is_moe else llm.mlp_dim
  vit_qkv = 3 * vit.num_heads * vit.head_dim
  extra = {"full": 0,
           "qkv_proj": llm.num_layers * tokens * qkv + vit.num_layers * patches * vit_qkv,
           "minimal": (llm.num_layers * tokens * (qkv + llm.d_model + hidden)
                       + vit.num_layers * patches * (vit_qkv + vit.width + vit.mlp_dim))}
  if policy not in extra:
    return None
  return float((base + extra[policy]) * compute_bytes)


def analytic_floor(param_count: int, chips: int, kept: float | None) -> dict[str, float | None]:
  """Per-chip floor: state (16 bytes per parameter spread over all chips) + kept activations."""
  state = STATE_BYTES_PER_PARAM * param_count / chips
  return {"state": state, "activations": kept,
          "total": state + kept if kept is not None else None}


def fsdp_minimum_collectives(gathered_elements: float, compute_bytes: int, micro_batches: int,
                             remat: bool) -> dict[str, float]:
  """Per-chip bytes (full-array convention of `collective_bytes`) that FSDP cannot avoid per step:
  every parameter gathered in the compute dtype for the forward pass and, under remat, again for
  the backward pass, and its gradient reduce-scattered once, per micro-batch.
  `gathered_elements` = sum over parameters of the size of the array one chip gathers (the
  parameter divided by its shards over the non-FSDP axes: tensor, expert)."""
  passes = 2 if remat else 1
  return {"all-gather": float(passes * gathered_elements * compute_bytes * micro_batches),
          "reduce-scatter": float(gathered_elements * compute_bytes * micro_batches)}


def _gathered_elements(abstract_params: Any, param_shardings: Any, mesh) -> float:
  total = 0.0
  for p, sh in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(param_shardings)):
    other = 1
    for entry in getattr(sh, "spec", ()):
      axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
      if "fsdp" not in axes:       # an FSDP entry (fsdp, or fsdp x expert) is gathered
        other *= int(np.prod([mesh.shape[a] for a in axes]))
    total += float(np.prod(p.shape)) / other
  return total


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
            *([f"  per-chip pinned host   {gib(r.host_bytes)}  (offloaded optimizer state)"]
              if r.host_bytes else []),
            *_efficiency_lines(r),
            f"  model FLOPs / step     {r.model_flops_per_step:.3e} (analytic)",
            f"  compiled FLOPs / step  {r.compiled_flops_per_step or 0:.3e} (XLA, scanned body counted once)"]
  return "\n".join(lines)


def _efficiency_lines(r: CompileReport) -> list[str]:
  gib = lambda b: f"{b / GiB:.2f} GiB"
  lines = []
  floor = r.floor_bytes or {}
  if floor:
    kept = floor.get("activations")
    kept_text = (f"{gib(kept)} kept activations (remat {r.remat_policy})" if kept is not None
                 else f"kept activations not modelled for remat {r.remat_policy}")
    lines.append(f"  analytic floor         {gib(floor['state'])} state (16 B/parameter / chips) + "
                 f"{kept_text}")
    if floor.get("total"):
      lines.append(f"                         = {gib(floor['total'])}; compiled total is "
                   f"{r.total_bytes / floor['total']:.2f}x the floor")
  if r.collective_bytes:
    minimum = r.fsdp_min_collective_bytes or {}
    lines.append("  collectives / step     per chip, full-array bytes (FSDP minimum)")
    for kind in COLLECTIVE_KINDS:
      extra = f"  ({gib(minimum[kind])})" if kind in minimum else ""
      lines.append(f"    {kind:<20} {gib(r.collective_bytes.get(kind, 0.0))}{extra}")
  return lines


def sharding_by_logical_axis(report: CompileReport) -> dict[str, list[str]]:
  """PartitionSpec -> parameter paths, for the printed sharding summary."""
  groups: dict[str, list[str]] = {}
  for path, spec in report.param_sharding.items():
    groups.setdefault(spec, []).append(path)
  return groups


# ------------------------------------------------------------------------------------------
# Generation (serving) step
# ------------------------------------------------------------------------------------------

def _compile_or_report(report: "CompileReport", mesh, lower: Callable[[], Any]):
  """Lowers and compiles under `mesh`, timing it into `report`; an over-HBM program (XLA reports
  it as RESOURCE_EXHAUSTED at compile time) returns None with `report.error` set."""
  start = time.time()
  try:
    with sharding_lib.activate(mesh):
      compiled = lower().compile()
  except Exception as e:
    report.compile_seconds = time.time() - start
    message = str(e)
    if "RESOURCE_EXHAUSTED" in message or "exceeds" in message.lower():
      report.error = _first_lines(message)
      return None
    raise
  report.compile_seconds = time.time() - start
  return compiled


def compile_generation_step(model_cfg: Any, topology: str, batch_size: int, prompt_length: int,
                            quantize: str = "int8", dtype: str = "bfloat16",
                            mesh_shape: Mapping[str, int] | None = None, crops: int | None = None,
                            prefill_rows_per_pass: int = 0,
                            param_layouts: str = "default") -> CompileReport:
  """Compiles generation as Predictor runs it, for `topology`: the prefill of a batch of
  `prompt_length`-token prompts (with images of `crops` crops, default max_crops + 1) into a
  KV cache, then one decode step, with the weights in `dtype` or quantized (`quantize`).

  mesh_shape: default all chips on the tensor axis (weights, KV cache and attention heads split;
  the batch replicated), the layout for a batch too small to split over 8 chips.
  param_layouts: "default" (the weights arrive in XLA's default memory layout, as a plain
  device_put leaves them) or "auto" (the compiler chooses their layouts: a server that places
  the weights once in the executable's `input_formats`). On TPU the scanned int8 kernels'
  default tiling is not the one the matmuls read, so with "default" XLA re-lays whole [L, ...]
  stacks out before the layer loops (a copy of several kernels of every layer).
  """
  from jax.experimental.layout import Format, Layout
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
    shardings = quantize_lib.quantized_shardings(abstract, float_sh, mesh, nn.unbox(boxed))
  else:
    abstract, shardings = nn.unbox(boxed), float_sh
  if param_layouts not in ("default", "auto"):
    raise ValueError(f"param_layouts {param_layouts!r}: expected default or auto")
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  crops = crops or config.preprocess.max_crops + 1
  spec = example_batch_shapes(config, batch_size, prompt_length, crops)
  spec["position_ids"] = jax.ShapeDtypeStruct((batch_size, prompt_length), jnp.int32)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.data_sharding(mesh, v.ndim))
           for k, v in spec.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
  in_shardings = None
  if param_layouts == "auto":
    in_shardings = (jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings),
                    {k: v.sharding for k, v in batch.items()}, rng.sharding)
  fn = jax.jit(functools.partial(_generate, model=model, sampling=SamplingConfig(max_new_tokens=1),
                                 prefill_rows_per_pass=prefill_rows_per_pass),
               in_shardings=in_shardings)
  report = CompileReport(
      topology=topology, chips=chips, mesh={k: int(v) for k, v in mesh.shape.items()}, fits=False,
      hbm_per_chip_bytes=HBM_BYTES[generation],
      param_count=int(sum(np.prod(p.shape) for p in jax.tree.leaves(nn.unbox(boxed)))),
      param_sharding=sharding_lib.describe(float_sh))
  compiled = _compile_or_report(report, mesh, lambda: fn.lower(params, batch, rng))
  if compiled is None:
    return report
  for key, value in _memory(compiled).items():
    setattr(report, key, value)
  report.fits = report.total_bytes <= report.hbm_per_chip_bytes
  return report
