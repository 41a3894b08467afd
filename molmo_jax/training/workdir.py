"""Integrity of a training workdir: one run at a time, one metrics row per step, no silent resume
of a different job.

  WorkdirLock(workdir)          `<workdir>/.lock` held (flock) by the running process; a second
                                run is refused, a lock left by a dead process is taken over
  check_and_record_configs      before anything is written: a resume whose model or data config
                                differs from the saved one is refused (UserError); other changes
                                (total_steps, logging, checkpoint interval, mesh, ...) are
                                allowed and reported; then model_config.json / train_config.json
                                are (re)written atomically
  trim_metrics(path, step)      metrics.jsonl keeps exactly one row per step 1..step (the last
                                complete checkpoint): rows of steps replayed after a kill, rows
                                written twice and a torn last line are dropped
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from molmo_jax.errors import UserError

_log = logging.getLogger("molmo_jax.train")

LOCK_FILE = ".lock"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
# Sections of the train config that define what is learned from what; a resume must keep them.
# (The model itself is compared as the resolved MolmoConfig, model_config.json.)
GUARDED_SECTIONS = ("model", "data")


class WorkdirLock:
  """An exclusive lock on `<workdir>/.lock` (fcntl.flock: released by the kernel when the process
  dies, so a stale lock file never blocks a new run; its pid/host are reported)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        _log.warning("%s: this file system does not support locks (%s); two runs in this workdir "
                     "would not be detected", self.path, e.strerror)
        return self
      owner = self._owner()
      raise UserError(f"--workdir {self.path.parent}",
                      f"another training run holds it ({owner})",
                      "wait for that run to finish or stop it, or use another --workdir") from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
      _log.warning("%s: taking over a lock left by a run that is gone (%s)", self.path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def _owner(self) -> str:
    try:
      return self.path.read_text().strip() or "pid unknown"
    except OSError:
      return "pid unknown"

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, 0)
      os.close(self._fd)      # releases the flock; the empty file stays (harmless)
      self._fd = None


def has_checkpoint(workdir: Path) -> bool:
  root = workdir / "checkpoints"
  return root.is_dir() and any(p.name.isdigit() and p.is_dir() for p in root.iterdir())


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, Mapping):
    out: dict[str, Any] = {}
    for key in value:
      out.update(_flatten(value[key], f"{prefix}{key}."))
    return out
  return {prefix[:-1]: value}


def _differences(old: Mapping, new: Mapping) -> list[str]:
  a, b = _flatten(old), _flatten(new)
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _listed(items: list[str], limit: int = 4) -> str:
  return "; ".join(items[:limit]) + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def check_and_record_configs(workdir: Path, model_config_json: str, train_config_json: str) -> list[str]:
  """Refuses a resume of another job, then records both configs; returns the reported changes.

  Only when the workdir holds a checkpoint is anything compared (a run killed before its first
  save left nothing to protect). Nothing in the workdir is written before the check passes.
  """
  model_path, train_path = workdir / MODEL_CONFIG_FILE, workdir / TRAIN_CONFIG_FILE
  changes: list[str] = []
  if has_checkpoint(workdir) and model_path.is_file():
    try:
      saved_model = json.loads(model_path.read_text())
    except (OSError, ValueError):
      saved_model = None
    if saved_model is not None:
      model_diff = _differences(saved_model, json.loads(model_config_json))
      if model_diff:
        raise UserError(f"--workdir {workdir}",
                        f"its checkpoints are of another model ({_listed(model_diff)})",
                        f"use a new --workdir, or the saved settings in {model_path}")
    saved_train = _read_json(train_path)
    new_train = json.loads(train_config_json)
    if saved_train is not None:
      guarded = [d for section in GUARDED_SECTIONS
                 for d in _differences({section: saved_train.get(section)},
                                       {section: new_train.get(section)})]
      if guarded:
        raise UserError(f"--workdir {workdir}",
                        f"resuming with another model or data config ({_listed(guarded)})",
                        f"use a new --workdir, or the saved settings in {train_path}")
      rest = {k: v for k, v in saved_train.items() if k not in GUARDED_SECTIONS}
      changes = _differences(rest, {k: v for k, v in new_train.items() if k not in GUARDED_SECTIONS})
      if changes:
        _log.warning("resuming with changed settings: %s", _listed(changes, limit=20))
  _atomic_write(model_path, model_config_json)
  _atomic_write(train_path, train_config_json)
  return changes


def _read_json(path: Path) -> dict | None:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def trim_metrics(path: Path, last_step: int) -> int:
  """Keeps one row per step <= last_step (the last written for a step), in step order; drops
  torn lines. Rewrites atomically, and only when something changes. Returns rows dropped."""
  if not path.is_file():
    return 0
  rows: dict[int, str] = {}
  dropped = 0
  lines = path.read_text().splitlines()
  for line in lines:
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if step > last_step:
      dropped += 1
      continue
    if step in rows:
      dropped += 1
    rows[step] = line
  kept = [rows[s] for s in sorted(rows)]
  if kept != lines:
    _atomic_write(path, "".join(line + "\n" for line in kept))
    if dropped:
      _log.info("%s: dropped %d row(s) of steps after the resumed checkpoint (step %d) or "
                "written twice", path, dropped, last_step)
  return dropped


@contextlib.contextmanager
def locked(workdir: Path, enabled: bool = True) -> Iterator[None]:
  if not enabled:
    yield
    return
  with WorkdirLock(workdir):
    yield
