"""Writing a whole directory safely: target checks, staging, the swap, and leftovers of killed runs.

    check_output_target(out, sources=[src], overwrite=..., force=..., kind="model directory",
                        is_kind=is_model_directory, flag="OUT_DIR")   # before any work
    with staged_directory(out) as staging:                             # write into `staging`
      ...
    # on success `staging` replaced `out` (two renames); on any error it is removed

Rules (what a converter or exporter promises):
  * the output is never the source, never a folder containing it, never inside it;
  * an existing output is replaced only with `overwrite`, and only when it is a directory of the
    kind being written (`is_kind`); anything else (a folder of other files, a file) needs `force`;
    an empty directory is taken as it is;
  * the old output is replaced only after the new one is complete: `out` holds either the old
    complete result or the new one at every instant;
  * staging folders are hidden siblings named `.<name>.partial-<host>-<pid>-<hex>` (the old
    output is parked as `.<name>.old-<host>-<pid>-<hex>` for the instant of the swap). A killed
    run leaves them behind; the next write to the same target removes those whose process is
    gone and reports (keeps) those of live processes or other hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from molmo_jax.errors import UserError

_log = logging.getLogger("molmo_jax.output")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def is_model_directory(path: Path) -> bool:
  """Our model directory: config.json + params/_METADATA (see molmo_jax.training.checkpoint)."""
  return (path / "config.json").is_file() and (path / "params" / "_METADATA").is_file()


def is_release_directory(path: Path) -> bool:
  """A Molmo release (HF) directory: config.json + safetensors weights."""
  return (path / "config.json").is_file() and (
      (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")))


def _resolved(path: str | os.PathLike) -> Path:
  return Path(os.path.realpath(os.path.abspath(path)))


def _inside(child: Path, parent: Path) -> bool:
  return child == parent or parent in child.parents


def check_output_target(out: str | os.PathLike, *, sources: Iterable[str | os.PathLike],
                        overwrite: bool, force: bool, kind: str,
                        is_kind: Callable[[Path], bool], flag: str = "output") -> Path:
  """Refuses (UserError) an output that would destroy a source or an unrelated directory.

  Returns the absolute output path. Call it before any work, so a refusal costs nothing.
  """
  out_abs = Path(os.path.abspath(out))
  target = _resolved(out)
  for source in sources:
    src = _resolved(source)
    if target == src:
      raise UserError(f"{flag} {out}", "is the source itself", "write to a new directory")
    if _inside(src, target):
      raise UserError(f"{flag} {out}", f"contains the source {source}",
                      "write to a directory outside the source")
    if _inside(target, src):
      raise UserError(f"{flag} {out}", f"is inside the source {source}",
                      "write to a directory outside the source")
  if out_abs.is_symlink() or os.path.lexists(out_abs):
    if out_abs.is_dir() and not out_abs.is_symlink() and not any(out_abs.iterdir()):
      pass                                   # an empty folder made for us
    elif force:
      pass
    elif not out_abs.is_dir() or out_abs.is_symlink():
      raise UserError(f"{flag} {out}", "exists and is not a directory",
                      "remove it, choose another path, or pass --force to replace it")
    elif not overwrite:
      raise UserError(f"{flag} {out}", "already exists",
                      f"pass --overwrite to replace a {kind}, or choose another path")
    elif not is_kind(out_abs):
      raise UserError(f"{flag} {out}", f"exists and is not a {kind}; --overwrite only replaces one",
                      "choose another path, or pass --force to replace it anyway")
  ancestor = out_abs.parent
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {out}", f"{ancestor} is not a writable folder",
                    "choose a writable location")
  return out_abs


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_leftovers(directory: str | os.PathLike) -> list[Path]:
  """Removes hidden staging folders of `directory` left by killed runs; returns what it removed.

  Leftovers of live processes (a conversion still running) and of other hosts are kept and
  reported; a parked old output whose target is missing is kept (it is the last complete copy).
  """
  directory = Path(os.path.abspath(directory))
  parent, removed = directory.parent, []
  if not parent.is_dir():
    return removed
  here = _host()
  for entry in sorted(parent.iterdir()):
    match = _LEFTOVER.match(entry.name)
    if not match or match["name"] != directory.name:
      continue
    pid = int(match["pid"])
    if match["host"] != here or _process_alive(pid) and pid != os.getpid():
      _log.warning("%s: left by process %s on %s, which may still be running; not removed",
                   entry, pid, match["host"])
      continue
    if match["kind"] == "old" and not directory.exists():
      _log.warning("%s: the previous %s, parked by a run killed during its final rename; "
                   "rename it back to %s to recover it", entry, directory.name, directory)
      continue
    _remove(entry)
    removed.append(entry)
    _log.warning("removed %s (left by an interrupted run, process %d)", entry, pid)
  return removed


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def _sibling(directory: Path, kind: str) -> Path:
  return directory.parent / f".{directory.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[Path]:
  """Yields a hidden sibling folder to write into; on success it replaces `directory`, on any
  error it is removed, so `directory` only ever holds a complete result (or its old contents).
  Leftovers of earlier killed runs for the same target are cleaned first (clean_leftovers)."""
  directory = Path(os.path.abspath(directory))
  directory.parent.mkdir(parents=True, exist_ok=True)
  clean_leftovers(directory)
  staging = _sibling(directory, "partial")
  try:
    staging.mkdir()
    yield staging
    _replace_directory(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _replace_directory(staging: Path, directory: Path) -> None:
  if not os.path.lexists(directory):
    os.rename(staging, directory)
    return
  # Two renames instead of rmtree-then-rename: at every instant `directory` is either the old
  # complete result or the new one.
  retired = _sibling(directory, "old")
  os.rename(directory, retired)
  os.rename(staging, directory)
  _remove(retired)
