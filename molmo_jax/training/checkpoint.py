"""Training checkpoints: the full training state of a run (Orbax CheckpointManager).

Training checkpoints live in `<root>/<step>/` with one Orbax item per part:

  params/          PyTree of arrays (the parameter tree of docs/architecture.md)
  opt_state/       PyTree of arrays (optax state; frozen parameters hold none)
  meta/            JSON: step, PRNG key (implementation name + key data), data-iterator state

Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when every item is
written, so a save killed half-way never shows up as a step (`latest_step` ignores it and the
next manager removes it). Model directories (what converters write and predict/eval read) are
`molmo_jax.model_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from molmo_jax import errors
from molmo_jax.model_dir import check_stored_tree

_ITEMS = ("params", "opt_state", "meta")


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
    self.async_save = bool(async_save)
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
      check_stored_tree(step_dir / "params", abstract_state["params"], f"checkpoint step {step}")

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
