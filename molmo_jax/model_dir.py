"""Model directories: the self-contained format converters write and predict / eval / training read.

  <dir>/params/        Orbax PyTree checkpoint of the parameters (tree of docs/architecture.md)
  <dir>/config.json    MolmoConfig.to_json()
  <dir>/tokenizer/     tokenizer files (optional)
  <dir>/quantization.json  only in a weight-only quantized directory (molmo_jax.quantize): the
                       mode; params/ then holds {qvalue, scale} for each quantized weight

Every loader also takes a training workdir (what train.py writes: checkpoints/<step>/params,
model_config.json, tokenizer/, and model/ at the end): `locate_model(path, step)` finds the
parameters of the latest (or the given) step, the config and the tokenizer. A LoRA run's step
(workdir/lora.json) loads with its adapters folded into the base.

A directory is assembled in a hidden sibling (`staged_directory`) and renamed into place at the
end, so a failed write leaves nothing at `<dir>` (or its previous contents). Every path may be
relative: Orbax wants absolute paths, so they are resolved here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import etils.epath as epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from molmo_jax import errors
from molmo_jax.config import MolmoConfig
from molmo_jax.output_dirs import staged_directory

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
QUANTIZATION_FILE = "quantization.json"
# A training workdir (molmo_jax.training.loop).
WORKDIR_CHECKPOINTS = "checkpoints"
WORKDIR_LORA = "lora.json"            # a LoRA run's LoraConfig (its checkpoints hold adapters)
WORKDIR_MODEL_CONFIG = "model_config.json"
WORKDIR_TRAIN_CONFIG = "train_config.json"
WORKDIR_MODEL = "model"


def absolute(path: str | os.PathLike) -> Path:
  """`path` with ~ expanded, made absolute against the working directory (Orbax needs that)."""
  return Path(os.path.abspath(Path(path).expanduser()))


# ------------------------------------------------------------------------------------------
# Parameter names
# ------------------------------------------------------------------------------------------

def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple[Any, ...]) -> str:
  """"/"-joined parameter name of a jax key path."""
  return "/".join(_key_name(k) for k in path)


# ------------------------------------------------------------------------------------------
# Tree validation
# ------------------------------------------------------------------------------------------

def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(path): tuple(leaf.shape) for path, leaf in flat}


def check_tree_matches(stored: Any, expected: Any, where: str) -> None:
  """Raises a ValueError listing missing, unexpected and mis-shaped leaves of `stored`."""
  have, want = _shapes_by_name(stored), _shapes_by_name(expected)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = [f"{n}: stored {have[n]}, expected {want[n]}"
                for n in sorted(set(have) & set(want)) if have[n] != want[n]]
  if missing or unexpected or mismatched:
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        problems.append(f"{label}: {shown}")
    raise ValueError(f"{where}: parameter tree does not match the expected one; "
                     + "; ".join(problems))


def check_stored_tree(directory: Path, target: Any, where: str) -> None:
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(absolute(directory))).tree
  except Exception as e:  # noqa: BLE001 - any failure to read _METADATA is unreadable storage
    raise errors.unreadable_data(where, e) from e
  check_tree_matches(stored, target, where)


def _local_target(directory: Path, where: str) -> Any:
  """The stored tree as ShapeDtypeStructs on this process's first device: a checkpoint saved
  sharded over another set of devices (a training run's) then loads anywhere."""
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(absolute(directory))).tree
  except Exception as e:  # noqa: BLE001 - any failure to read _METADATA is unreadable storage
    raise errors.unreadable_data(where, e) from e
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                      stored)


def _restore_pytree(directory: Path, target: Any, where: str) -> Any:
  if target is not None:
    check_stored_tree(directory, target, where)
  else:
    target = _local_target(directory, where)
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(epath.Path(absolute(directory)), args=ocp.args.StandardRestore(target))
  except Exception as e:  # noqa: BLE001 - the tree matched, so a failure here is the stored bytes
    raise errors.unreadable_data(where, e) from e


def restore_params_only(path: str | os.PathLike, abstract_params: Any = None) -> Any:
  """Parameters alone, to initialise training from a converted or earlier checkpoint.

  `path` may be a model directory, a training checkpoint step (`<root>/<step>`) or an Orbax
  PyTree directory itself. `abstract_params` (ShapeDtypeStructs with shardings) is validated
  against what is stored and used as the restore target.
  """
  path = absolute(path)
  if (path / QUANTIZATION_FILE).is_file():
    raise errors.UserError(str(path), "is a weight-only quantized model directory "
                           f"({QUANTIZATION_FILE})", "initialise from the float model directory")
  params_dir = path / PARAMS_DIR if (path / PARAMS_DIR).is_dir() else path
  if not (params_dir / "_METADATA").is_file():
    raise FileNotFoundError(f"{path}: no Orbax parameter checkpoint here (expected "
                            f"{path / PARAMS_DIR}/_METADATA or {path}/_METADATA)")
  return _restore_pytree(params_dir, abstract_params, str(path))


# ------------------------------------------------------------------------------------------
# Model directories
# ------------------------------------------------------------------------------------------

class ModelCheckpoint(NamedTuple):
  params: Any
  config: MolmoConfig
  tokenizer_dir: Path | None


def _config_text(config: MolmoConfig | str) -> str:
  if isinstance(config, MolmoConfig):
    return config.to_json()
  if not isinstance(config, str):
    raise ValueError(f"config_json: expected a MolmoConfig or its JSON text, got "
                     f"{type(config).__name__}")
  try:
    return MolmoConfig.from_json(config).to_json()
  except json.JSONDecodeError as e:
    raise ValueError(f"config_json: not valid JSON: {e}") from None


def save_model_checkpoint(directory: str | os.PathLike, params: Any, config_json: MolmoConfig | str,
                          tokenizer_dir: str | os.PathLike | None = None,
                          overwrite: bool = False,
                          extra_files: dict[str, str] | None = None) -> Path:
  """Writes a model directory atomically (see the module docstring); returns its path.

  extra_files: name -> text of more files written beside config.json (e.g. quantization.json).

  Single-process: the staging directory and the renames are done by this process (a multi-host
  converter must gather the parameters to one host or add a barrier around the renames).
  """
  directory = absolute(directory)
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
    raise FileNotFoundError(f"tokenizer_dir: {tokenizer_dir} is not a directory")
  config_text = _config_text(config_json)
  with staged_directory(directory) as staging:
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(epath.Path(staging / PARAMS_DIR), args=ocp.args.StandardSave(params))
    (staging / CONFIG_FILE).write_text(config_text)
    for name, text in (extra_files or {}).items():
      (staging / name).write_text(text)
    if tokenizer_dir is not None:
      shutil.copytree(tokenizer_dir, staging / TOKENIZER_DIR)
  return directory


# ------------------------------------------------------------------------------------------
# Model directory or training workdir
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where one model's parts are: a model directory, or one step of a training workdir."""

  path: Path                     # what was asked for (absolute)
  params_dir: Path               # an Orbax PyTree checkpoint of the parameters
  config_path: Path              # MolmoConfig JSON
  tokenizer_dir: Path | None
  step: int | None               # the training step (workdir), None for a model directory

  def describe(self) -> str:
    return str(self.path) if self.step is None else f"{self.path} (training step {self.step})"

  def read_config(self) -> MolmoConfig:
    try:
      return MolmoConfig.from_json(self.config_path.read_text())
    except (ValueError, TypeError) as e:
      raise ValueError(f"{self.config_path}: invalid model config: {e}") from None


def is_model_directory(path: Path) -> bool:
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def is_training_workdir(path: Path) -> bool:
  return (path / WORKDIR_CHECKPOINTS).is_dir() and (path / WORKDIR_MODEL_CONFIG).is_file()


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Completed training steps under `workdir/checkpoints` (interrupted saves are not listed)."""
  root = absolute(workdir) / WORKDIR_CHECKPOINTS
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / PARAMS_DIR / "_METADATA").is_file())


def _workdir_tokenizer(workdir: Path) -> Path | None:
  """workdir/tokenizer (written by train.py), else the recipe's tokenizer_dir or init_from's."""
  if (workdir / TOKENIZER_DIR).is_dir():
    return workdir / TOKENIZER_DIR
  try:
    recipe = json.loads((workdir / WORKDIR_TRAIN_CONFIG).read_text())
  except (OSError, ValueError):
    return None
  for candidate in (recipe.get("tokenizer_dir") or "",
                    str(Path(recipe["init_from"]) / TOKENIZER_DIR) if recipe.get("init_from") else ""):
    if candidate and not candidate.startswith("builtin:") and Path(candidate).is_dir():
      return absolute(candidate)
  return None


def locate_model(path: str | os.PathLike, step: int | None = None) -> ModelSource:
  """A model directory, or a training workdir's latest (or `step`) checkpoint.

  Raises FileNotFoundError / ValueError naming the path and what was expected."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (expected a model directory or a training "
                            "workdir)")
  if is_model_directory(path):
    if step is not None:
      raise ValueError(f"{path} is a model directory (one set of weights); a step ({step}) can only "
                       "be chosen in a training workdir")
    tokenizer = path / TOKENIZER_DIR
    return ModelSource(path, path / PARAMS_DIR, path / CONFIG_FILE,
                       tokenizer if tokenizer.is_dir() else None, None)
  if is_training_workdir(path):
    steps = checkpoint_steps(path)
    if step is None and not steps and is_model_directory(path / WORKDIR_MODEL):
      return locate_model(path / WORKDIR_MODEL)
    if not steps:
      raise FileNotFoundError(f"{path}: a training workdir without a complete checkpoint yet")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"{path}: no checkpoint of step {step}; have steps {steps}")
    return ModelSource(path, path / WORKDIR_CHECKPOINTS / str(step) / PARAMS_DIR,
                       path / WORKDIR_MODEL_CONFIG, _workdir_tokenizer(path), step)
  raise FileNotFoundError(
      f"{path}: neither a model directory ({CONFIG_FILE} + {PARAMS_DIR}/) nor a training workdir "
      f"({WORKDIR_CHECKPOINTS}/ + {WORKDIR_MODEL_CONFIG})")


def load_model_checkpoint(directory: str | os.PathLike, expected_params: Any = None,
                          step: int | None = None, quantized: bool = False) -> ModelCheckpoint:
  """Reads a model directory or a training workdir (latest step, or `step`); validates the
  config and (when given) the parameter tree.

  expected_params: a tree of arrays or jax.ShapeDtypeStruct (with `.sharding` to restore sharded,
    and a dtype to cast to); every path and shape must match what is stored.
  quantized: the caller reads weight-only quantized directories (molmo_jax.quantize); others
    are refused with a message saying what such a directory is for.
  """
  source = locate_model(directory, step)
  if not quantized and (source.path / QUANTIZATION_FILE).is_file():
    raise errors.UserError(str(source.path), "is a weight-only quantized model directory "
                           f"({QUANTIZATION_FILE}); its weights are not the float parameters",
                           "load it with predict, eval.py, the server or Predictor.from_checkpoint;"
                           " train, merge or export from the float model directory")
  config = source.read_config()
  if not (source.params_dir / "_METADATA").is_file():
    raise FileNotFoundError(f"{source.describe()}: missing {source.params_dir} (an Orbax PyTree "
                            "checkpoint)")
  if expected_params is not None:
    expected_params = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        expected_params)
  lora_cfg = _run_lora_config(source)
  if lora_cfg is None:
    params = _restore_pytree(source.params_dir, expected_params, source.describe())
  else:
    params = _merged_lora_step(source, lora_cfg, expected_params)
  return ModelCheckpoint(params=params, config=config, tokenizer_dir=source.tokenizer_dir)


def _run_lora_config(source: ModelSource) -> Any:
  """The LoraConfig of a LoRA training run (workdir/lora.json, rank > 0) when `source` is one of
  its steps, else None."""
  path = source.path / WORKDIR_LORA
  if source.step is None or not path.is_file():
    return None
  from molmo_jax import lora as lora_lib    # lora.py reads and writes model directories itself
  try:
    cfg = lora_lib.read_config(path)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  return cfg if cfg.enabled else None


def _merged_lora_step(source: ModelSource, cfg: Any, expected_params: Any) -> Any:
  """A LoRA run's checkpoint (base + lora_a / lora_b leaves) as a plain model's parameters: each
  adapted kernel W + a A.B, as `python -m molmo_jax.lora merge` and the run's model/ hold them."""
  from molmo_jax import lora as lora_lib
  where = source.describe()
  if cfg.quantized_base:
    raise errors.UserError(
        where, "a step of a LoRA run over an int8 base; its checkpoint holds int8 kernels, not "
        "a float model", "fold its adapters into the float base model: python -m molmo_jax.lora "
        f"merge --base BASE_MODEL_DIR --adapters {source.path / 'adapters'} --out DIR")
  stored = _restore_pytree(source.params_dir, None, where)
  merged = lora_lib.merged_run_params(stored, cfg)
  if expected_params is None:
    return merged
  check_tree_matches(merged, expected_params, where)
  return jax.tree.map(
      lambda x, want: jax.device_put(np.asarray(x).astype(want.dtype),
                                     getattr(want, "sharding", None)), merged, expected_params)
