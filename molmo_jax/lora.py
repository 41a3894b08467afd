"""LoRA: low-rank adapters beside the dense layers, a frozen base, adapter-only files, merging.

Legend: r rank, a = alpha / r the adapter scale, I = the contracted input dims of a dense layer
(`in_shape`), O = its output dims (`features`), L the stacked layer axis of scanned blocks.

A targeted `DenseGeneral` (kernel W [*I, *O]) computes

    y = x . W (+ bias)  +  a * (dropout(x) . A) . B        A [*I, r], B [r, *O]

The adapter is applied beside W, never materialised as W + a A.B, so no layer holds a second
full-size kernel. A starts fan-in scaled (std 1/sqrt(prod I)), B at zero: a fresh adapter
leaves the model's output unchanged bit for bit. The adapters are ordinary parameters named
`lora_a` / `lora_b` inside the layer they adapt (e.g. `llm/blocks/attention/query/lora_a`
[L, D, r] under the scanned blocks), so they get logical axes, shardings, the per-component
learning rate of their component and checkpoints like every other parameter;
`adapter_params` cuts them (plus any fully trained parameters) out as their own subtree.

They are added by a flax method interceptor around the model's init/apply (`LoraModel`), so the
model code carries no LoRA branch: with LoRA off nothing changes, not even the traced program.

int8 base (`base_dtype="int8"`, QLoRA-style): the frozen kernels of the layers that weight-only
int8 inference quantizes (`QuantizeConfig("int8")` of molmo_jax/quantize.py: the LLM's attention
q/k/v/o, dense MLP and LM head) are held as int8 values + per-output-channel scales, and those
layers run qwix's weight-only int8 matmul, the adapter beside it in float:

    y = (x . q) * s  +  a * (dropout(x) . A) . B          q int8 [*I, *O], s [1.., *O]

In the parameter tree each such kernel is {"qvalue", "scale"} (`quantize.to_storable`, the layout
of a saved quantized model directory); every other frozen leaf is bfloat16. A layer with a
parameter that trains (lora.train) is never quantized.

Files:
  save_adapters(dir, params, cfg)  ->  dir/adapters/ (Orbax tree of the trained leaves only)
                                        dir/lora.json  (LoraConfig.to_json())
  merge_adapters(params, adapters, cfg) -> the full tree with W + a A.B folded in (and the fully
                                        trained leaves replaced); a plain model again.
  Command line:  python -m molmo_jax.lora merge --base MODEL_DIR --adapters ADAPTER_DIR --out DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo_jax.models.layers import DenseGeneral, logical

Array = jax.Array

LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"
BASE_DTYPES = ("float32", "bfloat16", "int8")
_ADAPTERS_DIR = "adapters"
_CONFIG_FILE = "lora.json"

# Named groups of target layers: regexes searched in the "/"-joined module path of a DenseGeneral.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "llm_attention": (r"^llm/blocks/attention/(query|key|value|out)$",),
    "llm_mlp": (r"^llm/blocks/mlp/(gate|up|down)$",),
    "llm": (r"^llm/blocks/attention/(query|key|value|out)$", r"^llm/blocks/mlp/(gate|up|down)$"),
    "connector": (r"^connector/",),
    "vit": (r"^vision/",),
}
# Fully trained (not adapted, not frozen) parameter groups: regexes on "/"-joined parameter paths.
TRAIN_PRESETS: dict[str, tuple[str, ...]] = {
    "connector": (r"^connector/", r"^llm/embedding/new$"),
    "vit": (r"^vision/",),
    "norms": (r"norm/scale$",),
}


def _expand(items: tuple[str, ...], presets: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
  out: list[str] = []
  for item in items:
    out.extend(presets.get(item, (item,)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how. rank 0 = LoRA off (full fine-tuning, the default).

  targets: preset names (see TARGET_PRESETS: llm_attention, llm_mlp, llm, connector, vit) or
    regexes on DenseGeneral module paths ("llm/blocks/attention/query"). The MoE experts are
    stacked 3-D parameters, not dense layers, and cannot be adapted; the MoE model's attention can.
  train: parameters trained in full next to the adapters: preset names (TRAIN_PRESETS:
    connector (+ the new token rows), vit, norms) or regexes on parameter paths.
  base_dtype: how the frozen base is held during training: "float32", "bfloat16", or "int8"
    (the kernels weight-only int8 inference quantizes become int8 values + scales and run int8
    matmuls; every other frozen leaf is bfloat16). The adapters and fully trained parameters
    keep the model's param_dtype.
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("llm",)
  train: tuple[str, ...] = ()
  base_dtype: str = "float32"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank: expected >= 0 (0 = off), got {self.rank}")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha: expected > 0, got {self.alpha}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout: expected a rate in [0, 1), got {self.dropout}")
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"lora.base_dtype: expected float32, bfloat16 or int8, got "
                       f"{self.base_dtype!r}")
    if self.enabled and not self.targets:
      raise ValueError("lora.targets: empty; name at least one preset "
                       f"({sorted(TARGET_PRESETS)}) or module-path regex")
    for where, items in (("targets", self.target_patterns), ("train", self.train_patterns)):
      for pattern in items:
        try:
          re.compile(pattern)
        except re.error as e:
          raise ValueError(f"lora.{where}: {pattern!r} is not a valid regex: {e}") from None

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def quantized_base(self) -> bool:
    """int8 base: the frozen dense kernels are weight-only int8 (molmo_jax/quantize.py)."""
    return self.base_dtype == "int8"

  @property
  def frozen_dtype(self) -> str:
    """dtype of the frozen float leaves: base_dtype, or bfloat16 next to an int8 base."""
    return "bfloat16" if self.quantized_base else self.base_dtype

  @property
  def target_patterns(self) -> tuple[str, ...]:
    return _expand(self.targets, TARGET_PRESETS)

  @property
  def train_patterns(self) -> tuple[str, ...]:
    return _expand(self.train, TRAIN_PRESETS)

  def targets_module(self, path: str) -> bool:
    return any(re.search(p, path) for p in self.target_patterns)

  def trainable_patterns(self) -> tuple[str, ...]:
    """Parameter-path regexes of everything the optimizer updates (the rest is frozen)."""
    return (rf"(^|/)({LORA_A}|{LORA_B})$",) + self.train_patterns

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "LoraConfig":
    """From a dict / ml_collections.ConfigDict (None or {} = LoRA off)."""
    if cfg is None:
      return cls()
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f"lora config: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(cfg).items()}
    for key in ("targets", "train"):
      if isinstance(kwargs.get(key), str):
        kwargs[key] = tuple(s for s in kwargs[key].split(",") if s)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------
# The adapter inside a dense layer
# ------------------------------------------------------------------------------------------

def _module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.scope.path)


def _adapter_delta(module: DenseGeneral, x: Array, cfg: LoraConfig) -> Array:
  """a * (dropout(x) . A) . B for DenseGeneral `module` (x [..., *I] -> [..., *O])."""
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  in_shape = x.shape[x.ndim - module.contract:]
  in_axes, out_axes = module.axes[:module.contract], module.axes[module.contract:]
  std = 1.0 / math.sqrt(math.prod(in_shape))
  a = module.param(LORA_A, logical(nn.initializers.normal(std), (*in_axes, RANK_AXIS)),
                   in_shape + (cfg.rank,), module.param_dtype)
  b = module.param(LORA_B, logical(nn.initializers.zeros, (RANK_AXIS, *out_axes)),
                   (cfg.rank,) + features, module.param_dtype)
  if cfg.dropout > 0 and module.has_rng("dropout"):
    x = nn.Dropout(cfg.dropout, name="lora_dropout")(x, deterministic=False)
  dtype = module.dtype
  contract = tuple(range(x.ndim - module.contract, x.ndim))
  h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype),
                          ((contract, tuple(range(module.contract))), ((), ())))      # [..., r]
  delta = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))  # [..., *O]
  return delta * jnp.asarray(cfg.scale, dtype)


def interceptor(cfg: LoraConfig):
  """A flax method interceptor adding the adapter to every targeted DenseGeneral call."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, DenseGeneral)
        or not cfg.targets_module(_module_path(module))):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    # Beside an int8 kernel the adapter's matmuls must stay float: qwix would take A and B for
    # weights to quantize.
    with _quantize().float_matmuls() if cfg.quantized_base else contextlib.nullcontext():
      delta = _adapter_delta(module, args[0], cfg)
    return y + delta.astype(y.dtype)

  return intercept


def _quantize():
  from molmo_jax import quantize
  return quantize


@dataclasses.dataclass(frozen=True)
class _WithAdapters:
  """`module` (a Molmo, or a qwix-quantized one) with the adapter interceptor around init/apply."""

  module: Any
  lora: LoraConfig

  @property
  def config(self):
    return self.module.config

  def init(self, *args, **kwargs):
    with nn.intercept_methods(interceptor(self.lora)):
      return self.module.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(interceptor(self.lora)):
      return self.module.apply(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """A Molmo module with adapters: `.init` / `.apply` / `.config` like the module itself.

  The train step, the AOT planner and generation take it wherever they take a `Molmo`. With an
  int8 base (lora.base_dtype="int8") its parameter tree holds each quantized kernel as
  {"qvalue", "scale"} (see the module docstring); `float_model` is the same model with a float
  base (the tree of a model directory plus adapters) and `quantize_base` maps that tree to this
  one.
  """

  module: nn.Module
  lora: LoraConfig

  @property
  def config(self):
    return self.module.config

  def init(self, *args, **kwargs):
    variables = self._runner.init(*args, **kwargs)
    if not self.lora.quantized_base:
      return variables
    return {**variables, "params": _quantize().to_storable(variables["params"])}

  def apply(self, variables, *args, **kwargs):
    if self.lora.quantized_base:
      params = _quantize().from_storable(variables["params"], self._runner,
                                         self._abstract_quantized)
      variables = {**variables, "params": params}
    return self._runner.apply(variables, *args, **kwargs)

  @property
  def float_model(self) -> "LoraModel":
    """This model with a bfloat16 base instead of an int8 one (itself for a float base)."""
    if not self.lora.quantized_base:
      return self
    return LoraModel(self.module, dataclasses.replace(self.lora, base_dtype="bfloat16"))

  def quantize_base(self, params: Any) -> Any:
    """`float_model`'s parameter tree -> this model's (jit-able; arrays may be sharded): each
    kernel of the int8 base becomes {"qvalue", "scale"} (quantize.quantize_params, the scales
    in the kernel's dtype). The identity for a float base."""
    if not self.lora.quantized_base:
      return params
    quantize = _quantize()
    return quantize.to_storable(quantize.quantize_params(self._runner, params,
                                                         abstract=self._abstract_quantized))

  @functools.cached_property
  def base_quantization(self) -> Any:
    """The int8 base's QuantizeConfig: the inference rules (QuantizeConfig("int8")) minus every
    layer one of whose quantized parameters trains (a lora.train pattern matches it)."""
    quantize = _quantize()
    full = quantize.QuantizeConfig("int8")
    if not self.lora.train_patterns:
      return full
    probe = _WithAdapters(quantize.quantized_model(self.module, full), self.lora)
    names = quantize.quantized_leaves(quantize.abstract_quantized_params(probe))
    trained = sorted({name.rsplit("/", 1)[0] for name in names
                      if any(_is_trained(tuple(f"{name}{leaf}".split("/")), self.lora)
                             for leaf in ("", "/qvalue", "/scale"))})
    return dataclasses.replace(full, exclude=tuple(re.escape(m) for m in trained))

  @functools.cached_property
  def _runner(self) -> _WithAdapters:
    if not self.lora.quantized_base:
      return _WithAdapters(self.module, self.lora)
    quantize = _quantize()
    return _WithAdapters(quantize.quantized_model(self.module, self.base_quantization), self.lora)

  @functools.cached_property
  def _abstract_quantized(self) -> Any:
    return _quantize().abstract_quantized_params(self._runner)


def with_lora(module: nn.Module, cfg: LoraConfig | None) -> Any:
  """`module` itself when LoRA is off, else a LoraModel."""
  return LoraModel(module, cfg) if cfg is not None and cfg.enabled else module


# ------------------------------------------------------------------------------------------
# Parameter trees
# ------------------------------------------------------------------------------------------

def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if isinstance(
      tree, flax.core.FrozenDict) else tree)


def _is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1] in (LORA_A, LORA_B)


def _is_trained(path: tuple[str, ...], cfg: LoraConfig) -> bool:
  name = "/".join(path)
  return _is_adapter(path) or any(re.search(p, name) for p in cfg.train_patterns)


def adapter_params(params: Any, cfg: LoraConfig) -> dict:
  """The subtree LoRA trains: every lora_a / lora_b plus the fully trained parameters."""
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in _flat(params).items() if _is_trained(k, cfg)})


def base_params(params: Any) -> dict:
  """The tree without adapters (what a plain model directory stores)."""
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in _flat(params).items() if not _is_adapter(k)})


def combine(base: Any, adapters: Any) -> dict:
  """base tree + adapter subtree (adapter leaves win where both have a leaf)."""
  flat = _flat(base)
  flat.update(_flat(adapters))
  return flax.traverse_util.unflatten_dict(flat)


def cast_frozen(params: Any, cfg: LoraConfig) -> Any:
  """Frozen float leaves in cfg.frozen_dtype (works on arrays and ShapeDtypeStructs); integer
  leaves (an int8 base's values) are kept."""
  dtype = jnp.dtype(cfg.frozen_dtype)

  def cast(path, leaf):
    if (_is_trained(tuple(str(getattr(p, "key", p)) for p in path), cfg) or leaf.dtype == dtype
        or not jnp.issubdtype(leaf.dtype, jnp.floating)):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def merged_kernel(kernel: Array, a: Array, b: Array, scale: float) -> Array:
  """W + scale * A.B for W [L.., *I, *O], A [L.., *I, r], B [L.., r, *O] (L.. optional stack)."""
  lead = (a.ndim - 1) + (b.ndim - 1) - kernel.ndim
  if lead < 0 or a.shape[:lead] != b.shape[:lead] or a.shape[-1] != b.shape[lead]:
    raise ValueError(f"LoRA shapes do not fit the kernel: W {kernel.shape}, A {a.shape}, "
                     f"B {b.shape}")
  lead_shape = a.shape[:lead]
  a2 = a.reshape(lead_shape + (-1, a.shape[-1])).astype(jnp.float32)
  b2 = b.reshape(lead_shape + (b.shape[lead], -1)).astype(jnp.float32)
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_adapters(base: Any, adapters: Any, cfg: LoraConfig) -> dict:
  """A plain parameter tree: each adapted kernel becomes W + a A.B, fully trained leaves replace
  the base's, and no lora_a / lora_b remains."""
  flat = _flat(base)
  extra = _flat(adapters)
  out = {k: v for k, v in flat.items() if not _is_adapter(k)}
  for key, value in extra.items():
    if _is_adapter(key):
      continue
    if key not in out:
      raise ValueError(f"adapters: trained parameter {'/'.join(key)} is not in the base model")
    out[key] = value
  layers = {k[:-1] for k in extra if k[-1] == LORA_A}
  for layer in sorted(layers):
    kernel_key = layer + ("kernel",)
    if kernel_key + ("qvalue",) in out:
      raise ValueError(f"adapters: {'/'.join(layer)}/kernel of the base is int8 (a lora.base_dtype="
                       "int8 training state); merge into the float base model directory instead")
    if kernel_key not in out or layer + (LORA_B,) not in extra:
      raise ValueError(f"adapters: {'/'.join(layer)} has lora_a but no matching kernel/lora_b")
    out[kernel_key] = merged_kernel(out[kernel_key], extra[layer + (LORA_A,)],
                                    extra[layer + (LORA_B,)], cfg.scale)
  return flax.traverse_util.unflatten_dict(out)


def merged_run_params(params: Any, cfg: LoraConfig) -> dict:
  """A LoRA run's parameter tree (base + lora_a / lora_b + fully trained leaves) as a plain
  model's: `merge_adapters` of its own base and adapters."""
  return merge_adapters(base_params(params), adapter_params(params, cfg), cfg)


def init_adapters(model: LoraModel, rng: Array, init_batch: Mapping[str, Array]) -> dict:
  """Fresh adapter leaves only (the base's random init is dead code and compiled away); the
  same for an int8 base as for a float one."""
  model = model.float_model

  def make():
    params = nn.unbox(model.init(rng, dict(init_batch)))["params"]
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in _flat(params).items() if _is_adapter(k)})
  return jax.jit(make)()


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------

def save_adapters(directory: str | os.PathLike, params: Any, cfg: LoraConfig,
                  overwrite: bool = False) -> Path:
  """Writes the adapter subtree (adapter_params) and lora.json atomically; returns the path."""
  import etils.epath as epath
  import orbax.checkpoint as ocp
  from molmo_jax.output_dirs import staged_directory
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  tree = adapter_params(params, cfg)
  if not jax.tree.leaves(tree):
    raise ValueError("save_adapters: the parameters hold no lora_a / lora_b leaves")
  with staged_directory(directory) as staging:
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        epath.Path(staging / _ADAPTERS_DIR), args=ocp.args.StandardSave(tree))
    (staging / _CONFIG_FILE).write_text(cfg.to_json())
  return directory


def read_config(path: str | os.PathLike) -> LoraConfig:
  """The LoraConfig in a lora.json (an adapter directory's, or a LoRA run's workdir's); a
  ValueError naming the file if it is not one."""
  try:
    return LoraConfig.from_mapping(json.loads(Path(path).read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: invalid LoRA config: {e}") from None


def load_adapters(directory: str | os.PathLike) -> tuple[dict, LoraConfig]:
  """(adapter subtree as host arrays, its LoraConfig) from a save_adapters directory."""
  import etils.epath as epath
  import orbax.checkpoint as ocp
  directory = Path(directory)
  config_path = directory / _CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"{directory}: missing {_CONFIG_FILE}; not a LoRA adapter directory")
  cfg = read_config(config_path)
  tree_dir = directory / _ADAPTERS_DIR
  if not (tree_dir / "_METADATA").is_file():
    raise FileNotFoundError(f"{directory}: missing {_ADAPTERS_DIR}/ (an Orbax PyTree checkpoint)")
  handler = ocp.StandardCheckpointHandler()
  meta = handler.metadata(epath.Path(tree_dir)).tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                        meta)
  tree = handler.restore(epath.Path(tree_dir), args=ocp.args.StandardRestore(target))
  return tree, cfg


def merge_model_directory(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                          out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
  """base model directory + adapter directory -> a full model directory (config and tokenizer
  copied from the base)."""
  from molmo_jax.model_dir import load_model_checkpoint, save_model_checkpoint
  from molmo_jax.config import MolmoConfig
  from molmo_jax.models.molmo import abstract_params
  config_path = Path(base_dir) / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{base_dir}: no config.json; not a model directory")
  config = MolmoConfig.from_json(config_path.read_text())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  expected = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract_params(config))
  base = load_model_checkpoint(base_dir, expected_params=expected)
  adapters, cfg = load_adapters(adapter_dir)
  merged = merge_adapters(base.params, adapters, cfg)
  return save_model_checkpoint(out_dir, merged, config, tokenizer_dir=base.tokenizer_dir,
                               overwrite=overwrite)


def main(argv=None) -> int:
  from molmo_jax import errors, output_dirs
  p = errors.ArgumentParser(prog="python -m molmo_jax.lora", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  merge = sub.add_parser("merge", help="fold adapters into a base model -> a full model directory")
  merge.add_argument("--base", required=True, help="base model directory")
  merge.add_argument("--adapters", required=True, help="adapter directory (save_adapters)")
  merge.add_argument("--out", required=True, help="new model directory")
  merge.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
  args = p.parse_args(argv)
  output_dirs.check_output_target(args.out, sources=[args.base, args.adapters],
                                  overwrite=args.overwrite, force=False, kind="model directory",
                                  is_kind=output_dirs.is_model_directory, flag="--out")
  out = merge_model_directory(args.base, args.adapters, args.out, overwrite=args.overwrite)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  from molmo_jax import errors as _errors
  sys.exit(_errors.run_main(main))
