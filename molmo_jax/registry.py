"""Named registries: how optional parts (the demo's synthetic data, tokenizer and eval tasks, or a
user's own) plug into the library without the library importing them.

A module registers its entries when it is imported:

    SOURCE_KINDS.register("synthetic", open_synthetic)       # in molmo_jax/data/synthetic.py

and a recipe names the modules to import in `config.plugins` (train.py, aot.py and the run layer
import them before building anything); eval.py takes `--plugins`. Lookups of an unknown name fail
with the registered names and that hint.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Registry:
  """name -> value (a factory, a task, ...), filled by the modules that define the values."""

  def __init__(self, what: str, hint: str = ""):
    self.what = what
    self.hint = hint
    self._entries: dict[str, Any] = {}

  def register(self, name: str, value: T) -> T:
    """Adds `name` -> `value`; registering a name again replaces it (a module imported twice,
    e.g. as __main__, or a user's own version of an entry)."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.what} name: expected a non-empty str, got {name!r}")
    self._entries[name] = value
    return value

  def get(self, name: str) -> Any:
    try:
      return self._entries[name]
    except KeyError:
      known = ", ".join(self._entries) or "none"
      hint = f"; {self.hint}" if self.hint else ""
      raise ValueError(f"unknown {self.what} {name!r}; registered: {known}{hint}") from None

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def import_plugins(modules: Iterable[str] | str | None, where: str = "plugins") -> list[str]:
  """Imports each named module (so it registers its entries); returns the names imported.

  `modules` may be a comma-separated string or a sequence of module names."""
  if not modules:
    return []
  if isinstance(modules, str):
    modules = [m for m in (part.strip() for part in modules.split(",")) if m]
  imported = []
  for name in modules:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{where}: expected module names, got {name!r}")
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      raise ValueError(f"{where}: cannot import {name!r} ({e})") from None
    imported.append(name)
  return imported
