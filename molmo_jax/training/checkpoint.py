"""Checkpoints: training state (Orbax CheckpointManager) and self-contained model directories.

Training checkpoints live in `<root>/<step>/` with one Orbax item per part:

  params/          PyTree of arrays (the parameter tree of docs/architecture.md)
  opt_state/       PyTree of arrays (optax state; frozen parameters hold none)
  meta/            JSON: step, PRNG key (implementation name + key data), data-iterator state

Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when every item is
written, so a save killed half-way never shows up as a step (`latest_step` ignores it and the
next manager removes it).

A model directory is what converters write and predict/eval read:

  <dir>/params/        Orbax PyTree checkpoint of the parameters
  <dir>/config.json    MolmoConfig.to_json()
  <dir>/tokenizer/     tokenizer files (optional)

It is assembled in a hidden sibling directory and renamed into place at the end, so a failed
write leaves nothing at `<dir>` (molmo_jax.output_dirs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import etils.epath as epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from molmo_jax import errors
from molmo_jax.config import MolmoConfig
from molmo_jax.output_dirs import staged_directory
from molmo_jax.training.optimizer import path_name

_ITEMS = ("params", "opt_state", "meta")
_PARAMS_DIR = "params"
_CONFIG_FILE = "config.json"
_TOKENIZER_DIR = "tokenizer"


def _json_state(state: Any, where: str) -> Any:
  """Checks that `state` survives a JSON round trip unchanged (before an async save starts)."""
  try:
    text = json.dumps(state)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: expected a JSON-serialisable dict, got an error: {e}") from None
  if json.loads(text) != state:
    raise ValueError(f"{where}: does not survive a JSON round trip unchanged (tuples or non-string "
                     "keys?); store lists and string keys")
  return state


def _is_typed_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _rng_to_json(rng: Any) -> dict[str, Any] | None:
  """A PRNG key (typed or raw uint32) as JSON: it is a few words, replicated everywhere."""
  if rng is None:
    return None
  typed = _is_typed_key(rng)
  data = jax.random.key_data(rng) if typed else rng
  if isinstance(data, jax.Array) and not data.is_fully_addressable:
    data = data.addressable_data(0)
  data = np.asarray(data)
  if data.dtype != np.uint32:
    raise ValueError(f"rng: expected a jax PRNG key or its uint32 key data, got dtype {data.dtype}")
  return {"impl": str(jax.random.key_impl(rng)) if typed else None,
          "shape": list(data.shape), "data": data.ravel().tolist()}


def _rng_from_json(stored: dict[str, Any] | None, target: Any) -> Any:
  if stored is None:
    return None
  data = np.asarray(stored["data"], np.uint32).reshape(stored["shape"])
  if stored["impl"]:
    rng = jax.random.wrap_key_data(data, impl=stored["impl"])
  else:
    rng = jax.numpy.asarray(data)
  sharding = getattr(target, "sharding", None)
  return jax.device_put(rng, sharding) if sharding is not None else rng


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


def _check_stored_tree(directory: Path, target: Any, where: str) -> None:
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(directory)).tree
  except Exception as e:  # noqa: BLE001 - any failure to read _METADATA is unreadable storage
    raise errors.unreadable_data(where, e) from e
  check_tree_matches(stored, target, where)


def _restore_pytree(directory: Path, target: Any, where: str) -> Any:
  if target is not None:
    _check_stored_tree(directory, target, where)
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(epath.Path(directory), args=ocp.args.StandardRestore(target))
  except Exception as e:  # noqa: BLE001 - the tree matched, so a failure here is the stored bytes
    raise errors.unreadable_data(where, e) from e


# ------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------

class TrainCheckpointer:
  """Async save every `save_every` steps, keep the last `keep`, restore (sharded) state.

  Usage:
    ckpt = TrainCheckpointer(root, save_every=1000, keep=3)
    ckpt.save(step, params, opt_state, rng, data_state)            # no-op off the interval
    ckpt.save(last_step, ..., force=True)                          # at the end
    state = ckpt.restore(abstract_state={"params": sds_tree, ...}) # latest step
    ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, save_every: int, keep: int | None = 3,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every: expected >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep: expected >= 1 or None (keep all), got {keep}")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        # Leftovers of a killed save (`<step>.orbax-checkpoint-tmp*`) are removed in the
        # background on start-up (done before the first save).
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, params: Any, opt_state: Any, rng: Any = None,
           data_iterator_state: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (async) save of `step`; returns whether one was started.

    Off the save interval this does nothing unless `force`. A step already on disk is never
    overwritten (returns False). Arrays are copied to host before this returns, so the caller may
    donate their buffers to the next step.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    meta = {
        "step": step,
        "rng": _rng_to_json(rng),
        "data_iterator_state": _json_state(data_iterator_state, "data_iterator_state"),
    }
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
    ))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int | None = None,
              abstract_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Restores {params, opt_state, step, rng, data_iterator_state} of `step` (default latest).

    abstract_state: optional {"params": ..., "opt_state": ..., "rng": ...} trees of
      jax.ShapeDtypeStruct whose `.sharding` says where each array goes (e.g. NamedShardings on a
      mesh); parts left out are restored as saved. Without a target, opt_state comes back as plain
      lists/dicts rather than optax's NamedTuples: pass `jax.eval_shape(tx.init, params)` (with
      shardings) to resume training.
    """
    self._manager.wait_until_finished()   # a save of this process may still be in flight
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory}; "
                              f"have {self.all_steps()}")
    abstract_state = dict(abstract_state or {})
    unknown = sorted(set(abstract_state) - {"params", "opt_state", "rng"})
    if unknown:
      raise ValueError(f"abstract_state: unknown key(s) {unknown}; expected params, opt_state, rng")
    step_dir = self.directory / str(step)
    if abstract_state.get("params") is not None:
      _check_stored_tree(step_dir / "params", abstract_state["params"], f"checkpoint step {step}")

    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.get("params")),
          opt_state=ocp.args.StandardRestore(abstract_state.get("opt_state")),
          meta=ocp.args.JsonRestore(),
      ))
    except (ValueError, TypeError) as e:
      if errors.looks_like_bad_data(e):
        raise errors.unreadable_data(f"checkpoint {step_dir}", e) from e
      raise
    except OSError as e:
      raise errors.unreadable_data(f"checkpoint {step_dir}", e) from e
    meta = restored.meta
    return {
        "params": restored.params,
        "opt_state": restored.opt_state,
        "step": meta["step"],
        "rng": _rng_from_json(meta["rng"], abstract_state.get("rng")),
        "data_iterator_state": meta["data_iterator_state"],
    }

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params_only(path: str | os.PathLike, abstract_params: Any = None) -> Any:
  """Parameters alone, to initialise training from a converted or earlier checkpoint.

  `path` may be a model directory, a training checkpoint step (`<root>/<step>`) or an Orbax
  PyTree directory itself. `abstract_params` (ShapeDtypeStructs with shardings) is validated
  against what is stored and used as the restore target.
  """
  path = Path(path)
  params_dir = path / _PARAMS_DIR if (path / _PARAMS_DIR).is_dir() else path
  if not (params_dir / "_METADATA").is_file():
    raise FileNotFoundError(f"{path}: no Orbax parameter checkpoint here (expected "
                            f"{path / _PARAMS_DIR}/_METADATA or {path}/_METADATA)")
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
                          overwrite: bool = False) -> Path:
  """Writes a model directory atomically (see the module docstring); returns its path.

  Single-process: the staging directory and the renames are done by this process (a multi-host
  converter must gather the parameters to one host or add a barrier around the renames).
  """
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
    raise FileNotFoundError(f"tokenizer_dir: {tokenizer_dir} is not a directory")
  config_text = _config_text(config_json)
  with staged_directory(directory) as staging:
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(epath.Path(staging / _PARAMS_DIR), args=ocp.args.StandardSave(params))
    (staging / _CONFIG_FILE).write_text(config_text)
    if tokenizer_dir is not None:
      shutil.copytree(tokenizer_dir, staging / _TOKENIZER_DIR)
  return directory


def load_model_checkpoint(directory: str | os.PathLike, expected_params: Any = None
                          ) -> ModelCheckpoint:
  """Reads a model directory; validates config and (when given) the parameter tree.

  expected_params: a tree of arrays or jax.ShapeDtypeStruct (with `.sharding` to restore sharded,
    and a dtype to cast to); every path and shape must match what is stored.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"model directory {directory} does not exist")
  config_path = directory / _CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"{directory}: missing {_CONFIG_FILE}; not a model directory")
  try:
    config = MolmoConfig.from_json(config_path.read_text())
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: invalid model config: {e}") from None
  if not (directory / _PARAMS_DIR / "_METADATA").is_file():
    raise FileNotFoundError(f"{directory}: missing {_PARAMS_DIR}/ (an Orbax PyTree checkpoint)")
  if expected_params is not None:
    expected_params = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        expected_params)
  params = _restore_pytree(directory / _PARAMS_DIR, expected_params, str(directory))
  tokenizer = directory / _TOKENIZER_DIR
  return ModelCheckpoint(params=params, config=config,
                         tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
