"""Weight-only int8 / int4 inference with qwix (post-training quantization of a trained model).

Legend: W a dense kernel [*I, *O] (I contracted, O output dims), L the stacked layer axis of
scanned blocks, q = round(W / s) the quantized values, s the per-channel scale.

qwix intercepts the matmuls (`lax.dot_general`, `jnp.einsum`) of the modules its rules match and
runs them on quantized weights as (x . q) * s (`weight_only_dot_general`: no dequantized weight is
ever materialised); activations stay in the compute dtype ("weight-only"). Each
weight gets one scale per output channel (per element of O, and per layer of a scanned stack):
s = max|W| over the contracted dims I / (qmax + 0.5) (127.5 for int8, 7.5 for int4: qwix's bound,
the extreme values round to qmax), symmetric, no zero point, so |dequantize(q) - W| <= s / 2
everywhere.

What is quantized: every dense layer of the language model (attention q/k/v/o, dense MLP) and
its LM head, optionally the vision tower's dense layers (`vit`). The token embedding (a lookup,
not a matmul), norms, biases, the MoE block (router and experts) and the connector stay in the
model's dtype. LoRA training with an int8 base (`lora.base_dtype="int8"`, molmo_jax/lora.py)
holds its frozen kernels with these rules, this quantizer and these matmuls, adapters beside them
in float (`float_matmuls`).

  qmodel = quantized_model(Molmo(config), QuantizeConfig("int8"))
  qparams = quantize_params(qmodel, params)          # params: the model's float tree
  logits, _ = qmodel.apply({"params": qparams}, batch)

Saved quantized model directories (`python -m molmo_jax.quantize --model DIR --out QDIR`): a
model directory whose params/ holds {qvalue, scale} in place of each quantized weight (int4
values stored as int8) and whose quantization.json names the mode; Predictor.from_checkpoint
(and so predict, eval.py and the server) loads it without the float weights.

Scanned blocks: qwix derives each weight's scale axes from the per-layer weight it sees inside
`nn.scan`; `quantize_params` here quantizes the stacked [L, ...] arrays with the layer axis as an
extra channel axis, so every layer keeps its own scales (qwix's own quantize_params would take
the layer axis for a contracted one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("none", "int8", "int4")
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """mode: none | int8 | int4 (weight-only); vit: also quantize the vision tower; exclude:
  module paths (regexes matched against the whole "/"-joined path) kept in float where a rule
  would quantize them (a LoRA run's fully trained layers, molmo_jax/lora.py)."""

  mode: str = "int8"
  vit: bool = False
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantize: mode {self.mode!r} unknown; expected one of {MODES}")

  @property
  def enabled(self) -> bool:
    return self.mode != "none"

  @property
  def name(self) -> str:
    """The --quantize spelling: "int8", "int4+vit", "none"."""
    return self.mode + ("+vit" if self.vit else "")

  def rules(self) -> list:
    import qwix
    qtype = _QTYPES[self.mode]
    # Module paths are "/"-joined ("llm/blocks/attention/query"); `llm` itself owns the LM head.
    # The MoE block (router einsum, experts' ragged matmuls) is left in float.
    # The first matching rule wins: excluded modules match a rule that quantizes nothing.
    rules = [qwix.QtRule(module_path=path, weight_qtype=None) for path in self.exclude]
    rules.append(qwix.QtRule(module_path=r"llm(/blocks/(attention|mlp)/.*)?", weight_qtype=qtype))
    if self.vit:
      rules.append(qwix.QtRule(module_path=r"vision(/.*)?", weight_qtype=qtype))
    return rules


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A qwix-quantized Molmo: `.init` / `.apply` / `.config` like the module (generation and the
  Predictor take it wherever they take a Molmo). Its dense layers contract their kernels in the
  kernels' own shapes (models.layers.native_dots), the form qwix quantizes."""

  module: nn.Module

  @property
  def config(self):
    return self.module.config

  def init(self, *args, **kwargs):
    from molmo_jax.models.layers import native_dots
    with native_dots():
      return self.module.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    from molmo_jax.models.layers import native_dots
    with native_dots():
      return self.module.apply(*args, **kwargs)


def weight_only_dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, precision: Any = None,
                            preferred_element_type: Any = None, **kwargs) -> jax.Array:
  """lhs . dequantize(rhs) for a float `lhs` and a per-channel quantized weight `rhs`, computed as
  (lhs . q) * s: the integer values are converted to lhs's dtype inside the matmul and the
  per-output-channel scale s multiplies the product, so no dequantized copy of the weight is
  ever built (XLA fuses the convert into the dot). The same sum as qwix's dequantize-first path
  up to float rounding, because s is constant over the contracted axes. Anything else (a
  quantized lhs, a zero point, a scale that varies over a contracted axis) goes to qwix.

  Legend: for dot_general's output [*batch, *lhs_free, *rhs_free], s is read off the rhs free
  axes (and its batch axes) and broadcast over the lhs free axes.
  """
  from qwix._src.core import dot_general as qwix_dot, qarray
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (isinstance(lhs, qarray.QArray) or not isinstance(rhs, qarray.QArray)
      or rhs.zero_point is not None or not jnp.issubdtype(lhs.dtype, jnp.floating)
      or any(rhs.scale.shape[a] != 1 for a in rhs_contract)):
    return qwix_dot.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                preferred_element_type=preferred_element_type, **kwargs)
  result_type = preferred_element_type or jnp.result_type(lhs.dtype, rhs.scale.dtype)
  product = jax.lax.dot_general(lhs, rhs.qvalue.astype(lhs.dtype), dimension_numbers,
                                precision=precision, preferred_element_type=jnp.float32,
                                **kwargs)
  rhs_free = [a for a in range(rhs.ndim) if a not in rhs_contract and a not in rhs_batch]
  shape = rhs.scale.shape
  lhs_free = lhs.ndim - len(lhs_contract) - len(lhs_batch)
  scale = jnp.transpose(rhs.scale, tuple(rhs_batch) + tuple(rhs_free) + tuple(rhs_contract))
  scale = scale.reshape(tuple(shape[a] for a in rhs_batch) + (1,) * lhs_free
                        + tuple(shape[a] for a in rhs_free))
  return (product * scale.astype(jnp.float32)).astype(result_type)


@contextlib.contextmanager
def float_matmuls() -> Iterator[None]:
  """Inside, matmuls run in float even within a module a quantization rule matches (qwix's
  interception is off for this thread): for float parameters that sit beside a quantized kernel,
  such as a LoRA adapter (molmo_jax/lora.py), which qwix would otherwise take for an unquantized
  weight. A no-op outside a quantized model."""
  from qwix._src import interception
  disabled = interception.interception_manager.disable_interception()
  try:
    yield
  finally:
    interception.interception_manager.enable_interception(disabled)


def quantized_model(model: nn.Module, cfg: QuantizeConfig) -> Any:
  """`model` whose matched matmuls run on quantized weights (qwix PTQ, the matmuls through
  `weight_only_dot_general`); `model` itself when cfg.mode is none."""
  import qwix
  if not cfg.enabled:
    return model
  provider = qwix.PtqProvider(cfg.rules(), _dot_general_fn=weight_only_dot_general)
  return QuantizedModel(qwix.quantize_model(model, provider, methods=("__call__", "lm_logits")))


def _example_inputs(config: Any) -> dict[str, jax.ShapeDtypeStruct]:
  from molmo_jax.models.molmo import example_batch_shapes
  return example_batch_shapes(config)


def abstract_quantized_params(qmodel: nn.Module) -> Any:
  """The quantized model's parameter tree (ShapeDtypeStructs; quantized leaves are qwix WithAux
  wrappers around a QArray {qvalue, scale}), with logical-axis boxes removed."""
  variables = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), _example_inputs(qmodel.config))
  return nn.unbox(variables["params"])


def _is_with_aux(x: Any) -> bool:
  from qwix._src.providers.ptq import WithAux
  return isinstance(x, WithAux)


def quantize_params(qmodel: nn.Module, params: Any, stacked_prefixes: tuple[tuple[str, ...], ...]
                    = (("llm", "blocks"), ("vision", "blocks")), abstract: Any = None) -> Any:
  """The float parameter tree -> the quantized model's tree (jit-able; arrays may be sharded).

  Leaves under `stacked_prefixes` (the scanned blocks) carry a leading layer axis. `abstract`:
  `abstract_quantized_params(qmodel)` when the caller has it already.
  """
  abstract = abstract_quantized_params(qmodel) if abstract is None else abstract
  abstract_flat = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_with_aux(x))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  out = {}
  for path, value in flat.items():
    if path not in abstract_flat:
      raise ValueError(f"quantize_params: {'/'.join(path)} is not a parameter of the model")
    target = abstract_flat[path]
    if not _is_with_aux(target):
      out[path] = value
      continue
    lead = 1 if any(path[:len(p)] == p for p in stacked_prefixes) else 0
    out[path] = _quantize_with_lead(value, target, lead)
  missing = sorted("/".join(p) for p in set(abstract_flat) - set(flat))
  if missing:
    raise ValueError(f"quantize_params: parameters missing from the tree: {missing[:8]}")
  return flax.traverse_util.unflatten_dict(out)


def _quantize_with_lead(value: jax.Array, target: Any, lead: int) -> Any:
  import qwix
  how = target.how
  channelwise = tuple(range(lead)) + tuple(a + lead for a in how.channelwise_axes)
  tiled = {a + lead: t for a, t in dict(how.tiled_axes).items()}
  value = value.reshape(target.shape)
  q = qwix.quantize(value, how.qtype, channelwise_axes=channelwise, tiled_axes=tiled or None,
                    calibration_method=how.calibration_method, scale_dtype=value.dtype)
  return target.replace(array=q)


def dequantize_params(qparams: Any, like: Any = None) -> Any:
  """Quantized tree -> float tree (the weights the quantized model effectively computes with).

  qwix stores a weight in the shape its matmul uses (a dense kernel [*I, *O] as
  [prod I, prod O]); `like` (the float tree or its ShapeDtypeStructs) restores the model's shapes.
  """
  import qwix

  def convert(x):
    return qwix.dequantize(x.array) if _is_with_aux(x) else x

  out = jax.tree.map(convert, qparams, is_leaf=_is_with_aux)
  if like is not None:
    out = jax.tree.map(lambda x, ref: x.reshape(ref.shape), out, like)
  return out


def quantized_leaves(qparams: Any) -> dict[str, Any]:
  """'/'-joined path -> QArray of every quantized weight (for reports and tests)."""
  flat = flax.traverse_util.flatten_dict(qparams, is_leaf=lambda _, x: _is_with_aux(x))
  return {"/".join(k): v.array for k, v in flat.items() if _is_with_aux(v)}


def param_bytes(tree: Any) -> int:
  """Bytes of every array in a (possibly quantized) parameter tree (int4 counts half a byte)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    bits = jnp.dtype(leaf.dtype).itemsize * 8 if leaf.dtype != jnp.int4 else 4
    total += leaf.size * bits // 8
  return int(total)


def from_mapping(value: Any) -> QuantizeConfig:
  """'int8' / 'int8+vit' / {'mode': ..., 'vit': ...} / None -> QuantizeConfig."""
  if value is None or isinstance(value, QuantizeConfig):
    return value or QuantizeConfig("none")
  if isinstance(value, str):
    mode, _, extra = value.partition("+")
    if extra not in ("", "vit"):
      raise ValueError(f"--quantize {value!r}: expected none, int8, int4, int8+vit or int4+vit")
    return QuantizeConfig(mode, vit=extra == "vit")
  if isinstance(value, Mapping):
    return QuantizeConfig(**dict(value))
  raise ValueError(f"quantize: expected a mode string or mapping, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------
# Shardings of a quantized tree
# ------------------------------------------------------------------------------------------

def _merged_spec(float_shape: tuple[int, ...], spec: tuple, shape: tuple[int, ...]) -> tuple:
  """PartitionSpec of a row-major merge of `float_shape` into `shape` (qwix may keep a kernel in
  its 2-D compute shape): each merged dim takes the first mesh axis of the dims it merges
  (splitting the outer dim in blocks is the same layout as splitting the merged one)."""
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


def quantized_shardings(abstract: Any, float_shardings: Any, mesh, float_abstract: Any) -> Any:
  """Shardings of a quantized parameter tree (`abstract_quantized_params`) from the float tree's.

  A quantized weight's values share the float kernel's sharding; its per-channel scale keeps the
  kernel's rank with size-1 axes where the kernel was reduced, and those axes are not split.
  """
  from jax.sharding import NamedSharding, PartitionSpec
  flat_sh = flax.traverse_util.flatten_dict(float_shardings)
  flat_float = flax.traverse_util.flatten_dict(float_abstract)
  flat = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_with_aux(x))
  out = {}
  for path, leaf in flat.items():
    sharding = flat_sh[path]
    if not _is_with_aux(leaf):
      out[path] = sharding
      continue
    float_shape = flat_float[path].shape
    spec = tuple(sharding.spec) + (None,) * (len(float_shape) - len(sharding.spec))
    merged = _merged_spec(float_shape, spec, tuple(leaf.shape))

    def for_array(x, merged=merged, leaf=leaf):
      kept = tuple(s if dim != 1 or full == 1 else None
                   for s, dim, full in zip(merged, x.shape, leaf.shape))
      return NamedSharding(mesh, PartitionSpec(*kept))

    out[path] = jax.tree.map(for_array, leaf)
  return flax.traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------------
# Quantized model directories
# ------------------------------------------------------------------------------------------

def to_storable(qparams: Any) -> Any:
  """Quantized tree -> plain nested dicts: each quantized weight becomes {"qvalue", "scale"}
  (int4 values widened to int8: the same integers, a dtype every checkpoint store has). Also
  takes the boxed tree of `qmodel.init` (logical-axis boxes kept: the values carry the kernel's
  axis names, the scale the same names with None on its reduced, size-1 axes)."""
  def convert(x):
    if not _is_with_aux(x):
      return x
    q = x.array
    widen = getattr(q.qvalue, "dtype", None) == jnp.int4
    qvalue = q.qvalue.astype(jnp.int8) if widen else q.qvalue
    return {"qvalue": qvalue, "scale": q.scale}
  flat = flax.traverse_util.flatten_dict(qparams, is_leaf=lambda _, x: _is_with_aux(x))
  return flax.traverse_util.unflatten_dict({k: convert(v) for k, v in flat.items()})


def abstract_storable(qmodel: Any, mesh=None) -> Any:
  """The ShapeDtypeStructs (with shardings when `mesh` is given) of `to_storable`'s tree for
  `qmodel`: the restore target of a saved quantized directory."""
  from molmo_jax import sharding as sharding_lib
  from molmo_jax.models.molmo import abstract_variables
  abstract = abstract_quantized_params(qmodel)
  if mesh is not None:
    boxed = abstract_variables(qmodel.config)["params"]
    shardings = quantized_shardings(abstract, sharding_lib.param_shardings(boxed, mesh), mesh,
                                    nn.unbox(boxed))
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  stored = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.int8 if a.dtype == jnp.int4 else a.dtype,
                                        sharding=s), abstract, shardings)
  return to_storable(stored)


def from_storable(stored: Any, qmodel: Any, abstract: Any = None) -> Any:
  """`to_storable`'s tree (as restored) -> the quantized tree `qmodel.apply` takes (`abstract`:
  `abstract_quantized_params(qmodel)` when the caller has it already)."""
  from qwix._src.core.qarray import QArray
  abstract = abstract_quantized_params(qmodel) if abstract is None else abstract
  flat_abstract = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_with_aux(x))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stored))
  out = {}
  for path, target in flat_abstract.items():
    if not _is_with_aux(target):
      out[path] = flat[path]
      continue
    qvalue, scale = flat[path + ("qvalue",)], flat[path + ("scale",)]
    out[path] = target.replace(array=QArray(qvalue.astype(target.array.qvalue.dtype), scale,
                                            qtype=target.array.qtype))
  return flax.traverse_util.unflatten_dict(out)


def is_quantized_tree(params: Any) -> bool:
  return any(_is_with_aux(x) for x in jax.tree.leaves(params, is_leaf=_is_with_aux))


def saved_quantization(directory: str | os.PathLike) -> QuantizeConfig | None:
  """The QuantizeConfig of a saved quantized model directory, None for a float one."""
  from molmo_jax.model_dir import QUANTIZATION_FILE
  path = Path(directory) / QUANTIZATION_FILE
  if not path.is_file():
    return None
  try:
    return QuantizeConfig(**json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: expected {{\"mode\": \"int8\" | \"int4\", \"vit\": bool}}: {e}") from None


def save_quantized_model(source: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig,
                         dtype: str | None = "bfloat16", overwrite: bool = False) -> Path:
  """Reads the float model directory (or training workdir) `source`, quantizes it and writes a
  quantized model directory at `out` (atomically); the weights left in float are cast to
  `dtype` (None: the model's), which becomes the directory's config dtype."""
  from molmo_jax.model_dir import QUANTIZATION_FILE, load_model_checkpoint, save_model_checkpoint
  from molmo_jax.models.molmo import Molmo
  if not cfg.enabled:
    raise ValueError("--quantize none: nothing to save (the source is the float model)")
  ckpt = load_model_checkpoint(source)
  config = ckpt.config
  params = ckpt.params
  if dtype is not None:
    config = config.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  qmodel = quantized_model(Molmo(config), cfg)
  qparams = jax.jit(lambda p: quantize_params(qmodel, p))(params)
  return save_model_checkpoint(out, jax.device_get(to_storable(qparams)), config,
                               tokenizer_dir=ckpt.tokenizer_dir, overwrite=overwrite,
                               extra_files={QUANTIZATION_FILE: json.dumps(
                                   {"mode": cfg.mode, "vit": cfg.vit}) + "\n"})


def main(argv=None) -> int:
  from molmo_jax import errors, output_dirs
  p = errors.ArgumentParser(
      prog="python -m molmo_jax.quantize",
      description="Write a weight-only quantized model directory (int8 / int4 weights + "
                  "per-channel scales) from a float model directory; predict, eval.py, the "
                  "server and Predictor.from_checkpoint load it without --quantize.")
  p.add_argument("--model", required=True, help="float model directory or training workdir")
  p.add_argument("--out", required=True, help="new quantized model directory")
  p.add_argument("--quantize", choices=["int8", "int4", "int8+vit", "int4+vit"], default="int8",
                 help="weight-only mode (+vit: the vision tower too)")
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help="dtype of the scales, of the weights left in float and of the computation")
  p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
  args = p.parse_args(argv)
  output_dirs.check_output_target(args.out, sources=[args.model], overwrite=args.overwrite,
                                  force=False, kind="model directory",
                                  is_kind=output_dirs.is_model_directory, flag="--out")
  out = save_quantized_model(args.model, args.out, from_mapping(args.quantize), dtype=args.dtype,
                             overwrite=args.overwrite)
  print(f"wrote {out}")
  return 0


def run() -> None:
  """Console entry point (`molmo-quantize`)."""
  from molmo_jax import errors
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
