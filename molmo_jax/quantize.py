"""Weight-only int8 / int4 inference with qwix (post-training quantization of a trained model).

Legend: W a dense kernel [*I, *O] (I contracted, O output dims), L the stacked layer axis of
scanned blocks, q = round(W / s) the quantized values, s the per-channel scale.

qwix intercepts the matmuls (`lax.dot_general`, `jnp.einsum`) of the modules its rules match and
runs them on quantized weights; activations stay in the compute dtype ("weight-only"). Each
weight gets one scale per output channel (per element of O, and per layer of a scanned stack):
s = max|W| over the contracted dims I / (qmax + 0.5) (127.5 for int8, 7.5 for int4: qwix's bound,
the extreme values round to qmax), symmetric, no zero point, so |dequantize(q) - W| <= s / 2
everywhere.

What is quantized: every dense layer of the language model (attention q/k/v/o, dense MLP) and
its LM head, optionally the vision tower's dense layers (`vit`). The token embedding (a lookup,
not a matmul), norms, biases, the MoE block (router and experts) and the connector stay in the
model's dtype.

  qmodel = quantized_model(Molmo(config), QuantizeConfig("int8"))
  qparams = quantize_params(qmodel, params)          # params: the model's float tree
  logits, _ = qmodel.apply({"params": qparams}, batch)

Scanned blocks: qwix derives each weight's scale axes from the per-layer weight it sees inside
`nn.scan`; `quantize_params` here quantizes the stacked [L, ...] arrays with the layer axis as an
extra channel axis, so every layer keeps its own scales (qwix's own quantize_params would take
the layer axis for a contracted one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("none", "int8", "int4")
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """mode: none | int8 | int4 (weight-only); vit: also quantize the vision tower."""

  mode: str = "int8"
  vit: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantize: mode {self.mode!r} unknown; expected one of {MODES}")

  @property
  def enabled(self) -> bool:
    return self.mode != "none"

  def rules(self) -> list:
    import qwix
    qtype = _QTYPES[self.mode]
    # Module paths are "/"-joined ("llm/blocks/attention/query"); `llm` itself owns the LM head.
    # The MoE block (router einsum, experts' ragged matmuls) is left in float.
    rules = [qwix.QtRule(module_path=r"llm(/blocks/(attention|mlp)/.*)?", weight_qtype=qtype)]
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


def quantized_model(model: nn.Module, cfg: QuantizeConfig) -> Any:
  """`model` whose matched matmuls run on quantized weights (qwix PTQ); `model` itself when
  cfg.mode is none."""
  import qwix
  if not cfg.enabled:
    return model
  return QuantizedModel(qwix.quantize_model(model, qwix.PtqProvider(cfg.rules()),
                                            methods=("__call__", "lm_logits")))


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
                    = (("llm", "blocks"), ("vision", "blocks"))) -> Any:
  """The float parameter tree -> the quantized model's tree (jit-able; arrays may be sharded).

  Leaves under `stacked_prefixes` (the scanned blocks) carry a leading layer axis.
  """
  abstract = abstract_quantized_params(qmodel)
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
