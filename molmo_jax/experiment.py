"""The run layer: a training recipe (an ml_collections ConfigDict, configs/*.py) -> the pieces of a run.

    exp = experiment.build(config)                 # this process's devices (or a TPU topology's)
    state = exp.init_state()                       # sharded; exp.abstract_state for compile-only
    state, metrics = exp.train_step(state, batch)  # jitted, donated state
    metrics = exp.eval_step(state.params, batch)   # held-out loss, no dropout

One sequence, used by `training.loop.train`, the AOT planner (`training.aot`), benchmarks and
tests: plugins named by `config.plugins` are imported (they register data source kinds,
tokenizers, eval tasks) -> model config (a preset, tiny-<family> or init_from's config.json, then
the recipe's overrides) -> data config -> crop slots -> mesh -> model -> batch shapes ->
optimizer (its schedules know total_steps) -> abstract state with shardings -> jitted steps.

Legend: B global batch, T tokens (data.seq_len), N crop slots (max_crops + 1).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from molmo_jax import config as model_config_lib
from molmo_jax import sharding as sharding_lib
from molmo_jax.config import MolmoConfig
from molmo_jax.registry import import_plugins

_MODEL_SECTIONS = ("vision", "connector", "llm", "preprocess")
_log = logging.getLogger("molmo_jax.train")


# ------------------------------------------------------------------------------------------
# Recipe -> configs
# ------------------------------------------------------------------------------------------

def load_recipe(spec: str):
  """'path/to/recipe.py[:arg]' -> its get_config(arg), as `--config` reads it (for scripts and
  benchmarks that name a recipe without a command line)."""
  path, _, arg = str(spec).partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"recipe {path!r}: no such file")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"recipe {path}: defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def import_recipe_plugins(config: Any) -> list[str]:
  """Imports the modules in `config.plugins` (they register source kinds, tokenizers, tasks)."""
  return import_plugins(tuple(config.get("plugins") or ()), "config.plugins")


def build_model_config(model: Mapping[str, Any], init_from: str = "") -> MolmoConfig:
  """MolmoConfig from `config.model`: a preset or tiny-<family> name, else init_from's config.json,
  then the overrides in model.{dtype, param_dtype, remat_policy} and model.{llm, vision, ...}."""
  name = model.get("name") or ""
  if name.startswith("tiny-"):
    cfg = model_config_lib.tiny(name[len("tiny-"):])
  elif name:
    cfg = model_config_lib.preset(name)
  elif init_from:
    from molmo_jax.model_dir import locate_model
    cfg = locate_model(init_from).read_config()     # a model directory or a training workdir
  else:
    raise ValueError("config.model.name: give a preset (e.g. molmo-7b-d), tiny-<family>, or set "
                     "init_from to a converted model directory")
  top = {k: model[k] for k in ("dtype", "param_dtype", "remat_policy", "scan_unroll")
         if model.get(k)}
  for section in _MODEL_SECTIONS:
    # Unset fields (None: the recipe's typed placeholders) keep the preset's value.
    overrides = {k: v for k, v in dict(model.get(section) or {}).items() if v is not None}
    if not overrides:
      continue
    current = getattr(cfg, section)
    known = {f.name for f in dataclasses.fields(current)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"config.model.{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    top[section] = dataclasses.replace(current, **overrides)
  return cfg.replace(**top)


def data_config(data: Mapping[str, Any]):
  """DataConfig from `config.data`; `sources` may be {name: source} (CLI-overridable) or a list."""
  from molmo_jax.data.pipeline import DataConfig
  data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
  sources = data.get("sources") or {}
  if isinstance(sources, Mapping):
    sources = [{"name": name, **dict(source)} for name, source in sources.items()]
  data["sources"] = sources
  return DataConfig.from_dict(data)


def tokenizer_location(tokenizer_dir: str, init_from: str) -> str:
  """`config.tokenizer_dir` ("builtin:<name>" or a directory), else init_from's tokenizer/."""
  location = tokenizer_dir
  if not location and init_from:
    from molmo_jax.model_dir import locate_model
    found = locate_model(init_from).tokenizer_dir
    location = str(found) if found else str(Path(init_from) / "tokenizer")
  if not location:
    raise ValueError("config.tokenizer_dir: set it to a directory with tokenizer.json (or a "
                     "registered 'builtin:<name>'), or use init_from with a tokenizer/ inside")
  return location


def load_tokenizer(tokenizer_dir: str, init_from: str, model_cfg: MolmoConfig):
  """The MolmoTokenizer a recipe names (a built-in name, a directory, or init_from's)."""
  from molmo_jax.preprocess.tokens import MolmoTokenizer
  return MolmoTokenizer.from_name_or_directory(tokenizer_location(tokenizer_dir, init_from),
                                               model_cfg.llm.vocab_size)


def warmup_steps(value: float, total_steps: int, where: str) -> int:
  """A component's warmup: steps (int >= 1), or a fraction of the run (0 < value < 1); a warmup
  as long as the run or longer is clamped to 10 % of it, with a warning."""
  value = float(value)
  if value < 0:
    raise ValueError(f"{where}: expected a step count or a fraction in (0, 1), got {value}")
  steps = round(value * total_steps) if 0 < value < 1 else int(value)
  if steps >= total_steps > 0:
    clamped = max(total_steps // 10, 1 if total_steps > 1 else 0)
    _log.warning("%s=%s is >= total_steps=%d (the learning rate would never leave the warmup); "
                 "using %d steps (10 %% of the run). Set it below total_steps, or as a fraction "
                 "such as 0.1", where, value if 0 < value < 1 else int(value), total_steps, clamped)
    steps = clamped
  return steps


def lora_config(config: Any):
  """LoraConfig from `config.lora` (absent or rank 0 = full fine-tuning)."""
  from molmo_jax import lora as lora_lib
  return lora_lib.LoraConfig.from_mapping(config.get("lora"))


def optimizer_config(config: Any):
  """OptimizerConfig from `config.optimizer`, with the run's total_steps and every component's
  warmup resolved (`warmup_steps`: steps or a fraction of the run, clamped below total_steps).
  With LoRA (config.lora.rank > 0) only the adapters and lora.train's parameters train."""
  from molmo_jax.training.optimizer import OptimizerConfig
  total = int(config.total_steps)
  options = config.optimizer.to_dict()
  for component in ("connector", "vit", "llm"):
    if isinstance(options.get(component), Mapping) and "warmup_steps" in options[component]:
      options[component] = dict(options[component], warmup_steps=warmup_steps(
          options[component]["warmup_steps"], total, f"optimizer.{component}.warmup_steps"))
  lora = lora_config(config)
  if lora.enabled:
    if options.get("trainable_patterns"):
      raise ValueError("config.optimizer.trainable_patterns and config.lora both choose what "
                       "trains; use lora.train for parameters trained in full next to adapters")
    options["trainable_patterns"] = lora.trainable_patterns()
  return OptimizerConfig.from_mapping({**options, "total_steps": total})


# ------------------------------------------------------------------------------------------
# The run's pieces
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Experiment:
  """Everything built from one recipe; steps are jitted on first use (then cached)."""

  config: Any
  model_config: MolmoConfig
  data_config: Any                   # molmo_jax.data.pipeline.DataConfig
  max_crops: int                     # high-res crops per example; N = max_crops + 1 slots
  mesh: jax.sharding.Mesh
  model: Any                         # molmo_jax.models.molmo.Molmo
  batch_spec: dict[str, jax.ShapeDtypeStruct]    # global batch [B, ...]
  optimizer: Any                     # molmo_jax.training.optimizer.MolmoOptimizer
  abstract_state: Any                # TrainState of ShapeDtypeStructs with shardings
  state_shardings: Any               # TrainState of NamedShardings
  step_config: Any                   # molmo_jax.training.train_step.StepConfig
  lora: Any = None                   # molmo_jax.lora.LoraConfig (rank 0 = off)
  offload_opt_state: bool = False    # AdamW moments in pinned host memory (offload_optimizer_state)

  @property
  def frozen_dtype(self) -> str | None:
    """dtype of the frozen float leaves in a LoRA run (None: parameters keep the model's dtype);
    bfloat16 next to an int8 base (lora.base_dtype="int8")."""
    return self.lora.frozen_dtype if self.lora is not None and self.lora.enabled else None

  @property
  def init_from(self) -> str:
    return self.config.get("init_from") or ""

  @property
  def total_steps(self) -> int:
    return int(self.config.total_steps)

  @functools.cached_property
  def train_step(self) -> Callable:
    """step(state, batch) -> (state, metrics); `.jitted` lowers for AOT compilation."""
    from molmo_jax.training import train_step as step_lib
    return step_lib.make_train_step(self.model, self.optimizer, self.mesh, self.state_shardings,
                                    self.batch_spec, self.step_config)

  @functools.cached_property
  def eval_step(self) -> Callable:
    """eval_step(params, batch) -> metrics (loss, accuracy, ... of a held-out batch)."""
    from molmo_jax.training import train_step as step_lib
    return step_lib.make_eval_step(self.model, self.mesh, self.state_shardings.params,
                                   self.batch_spec, self.step_config.z_loss_weight)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs with their shardings (for `.lower`)."""
    from molmo_jax.training import train_step as step_lib
    shardings = step_lib.batch_shardings(self.mesh, self.batch_spec)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in self.batch_spec.items()}

  def init_state(self, params: Any = None, seed: int | None = None):
    """A fresh sharded TrainState (random init from `config.seed`, or the given params)."""
    from molmo_jax.training import train_step as step_lib
    rng = jax.random.PRNGKey(int(self.config.seed if seed is None else seed))
    return step_lib.init_train_state(self.model, self.optimizer, self.mesh, self.batch_spec, rng,
                                     params=params, frozen_dtype=self.frozen_dtype,
                                     offload_opt_state=self.offload_opt_state)

  def tokenizer(self):
    return load_tokenizer(self.config.get("tokenizer_dir") or "", self.init_from, self.model_config)

  def train_iterator(self, tokenizer=None, process_index: int | None = None,
                     process_count: int | None = None):
    """This process's rows of the configured mixture (a resumable iterator of local batches)."""
    from molmo_jax.data.pipeline import make_train_iterator
    return make_train_iterator(
        self.data_config, self.model_config, tokenizer or self.tokenizer(),
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count)

  def step_flops(self) -> float:
    """Analytic model FLOPs of one train step (forward + backward) over the global batch."""
    from molmo_jax.training import flops as flops_lib
    return flops_lib.train_step_flops(self.model_config, self.data_config.global_batch_size,
                                      self.data_config.seq_len, self.max_crops + 1).train

  def param_count(self) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.abstract_state.params)))


def build(config: Any, devices: Sequence[Any] | None = None,
          mesh_shape: Mapping[str, int] | None = None) -> Experiment:
  """The run `config` describes, on `devices` (default: every device of every process).

  mesh_shape: overrides `config.mesh` (e.g. the AOT planner's per-slice meshes).
  """
  from molmo_jax import lora as lora_lib
  from molmo_jax.models.molmo import Molmo
  from molmo_jax.training import train_step as step_lib
  from molmo_jax.training.optimizer import build_optimizer

  import_recipe_plugins(config)
  init_from = config.get("init_from") or ""
  model_cfg = build_model_config(config.model, init_from)
  data_cfg = data_config(config.data)
  max_crops = data_cfg.max_crops or model_cfg.preprocess.max_crops
  mesh_kwargs = dict(mesh_shape if mesh_shape is not None else dict(config.mesh))
  if devices is not None:
    mesh_kwargs["devices"] = devices
  mesh = sharding_lib.make_mesh(**mesh_kwargs)
  lora = lora_config(config)
  model = lora_lib.with_lora(Molmo(model_cfg), lora)
  spec = step_lib.data_batch_spec(model_cfg, data_cfg)
  step_cfg = step_lib.StepConfig.from_config(config)
  optimizer = build_optimizer(optimizer_config(config), step_lib.abstract_params(model, spec))
  offload = bool(config.get("offload_optimizer_state", False))
  abstract, shardings = step_lib.abstract_train_state(
      model, optimizer, mesh, spec, lora.frozen_dtype if lora.enabled else None, offload)
  return Experiment(config=config, model_config=model_cfg, data_config=data_cfg,
                    max_crops=max_crops, mesh=mesh, model=model, batch_spec=spec,
                    optimizer=optimizer, abstract_state=abstract, state_shardings=shardings,
                    step_config=step_cfg, lora=lora, offload_opt_state=offload)

