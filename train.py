"""Command line for training (a thin layer over molmo_jax.training.loop.train).

  python train.py --config configs/finetune_custom.py:model=/ckpt/m,data=/d/train.jsonl \
      --workdir /ckpt/run [--config.total_steps=2000] [--config.model.dtype=float32 ...]

--config FILE[:ARG]   a Python file whose get_config(ARG) returns an ml_collections.ConfigDict
--config.a.b=VALUE    override a field; VALUE is read with the field's current type (bool: true /
                      false; None, tuples, lists and dicts as Python literals). Only
                      model.{llm,vision,connector,preprocess}.* and data.sources.* accept new keys.
--workdir DIR         checkpoints, logs and TensorBoard events; rerunning resumes from it.

--debug               print the traceback of an error (also MOLMO_JAX_DEBUG=1)

SIGTERM / SIGINT are honoured from the moment the command starts: the run stops after the current
step with a checkpoint (or, before the first step, without running a step or saving). One run per
workdir at a time (a lock file); a resume with another model or data config is refused.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from molmo_jax import errors

_OPEN_SECTIONS = ("model.llm.", "model.vision.", "model.connector.", "model.preprocess.",
                  "data.sources.", "data.group_rates.")


class UsageError(errors.UserError):
  def __init__(self, message: str):
    super().__init__(message)


def load_config_file(spec: str):
  """'path.py[:arg]' -> get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise UsageError(f"--config: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UsageError(f"--config: {path} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def parse_value(text: str, current: Any, where: str) -> Any:
  """A command-line string as the type of the field it replaces."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
      raise UsageError(f"{where}: expected true or false, got {text!r}")
    return lowered in ("true", "1")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise UsageError(f"{where}: expected an integer, got {text!r}") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise UsageError(f"{where}: expected a number, got {text!r}") from None
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text   # a None field given a plain word, e.g. a path


def apply_override(config, dotted: str, text: str) -> None:
  import ml_collections
  parts = dotted.split(".")
  node = config
  for depth, key in enumerate(parts[:-1]):
    if key not in node:
      prefix = ".".join(parts[:depth + 1]) + "."
      if not any(prefix.startswith(s) or s.startswith(prefix) for s in _OPEN_SECTIONS):
        raise UsageError(f"--config.{dotted}: {'.'.join(parts[:depth + 1])!r} is not a config field")
      node[key] = ml_collections.ConfigDict()
    node = node[key]
    if not isinstance(node, ml_collections.ConfigDict):
      raise UsageError(f"--config.{dotted}: {'.'.join(parts[:depth + 1])!r} is not a section")
  leaf = parts[-1]
  if leaf not in node:
    if not any(dotted.startswith(s) for s in _OPEN_SECTIONS):
      known = ", ".join(sorted(node.keys()))
      raise UsageError(f"--config.{dotted}: unknown field {leaf!r}; known here: {known}")
    node[leaf] = parse_value(text, None, f"--config.{dotted}")
    return
  value = parse_value(text, node[leaf], f"--config.{dotted}")
  try:
    node[leaf] = value
  except TypeError as e:
    raise UsageError(f"--config.{dotted}: {e}") from None


def parse_args(argv: list[str]):
  """-> (config with overrides applied, workdir)."""
  config_spec, workdir, overrides = None, None, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    name, sep, value = arg.partition("=")
    if not sep and name in ("--config", "--workdir") or (name.startswith("--config.") and not sep):
      if i + 1 >= len(argv):
        raise UsageError(f"{name}: missing value")
      value, i = argv[i + 1], i + 1
    if name == "--config":
      config_spec = value
    elif name == "--workdir":
      workdir = value
    elif name.startswith("--config."):
      overrides.append((name[len("--config."):], value))
    else:
      raise UsageError(f"unknown argument {arg!r}; expected --config, --config.<field>, --workdir")
    i += 1
  if not config_spec or not workdir:
    raise UsageError("both --config FILE[:ARG] and --workdir DIR are required")
  config = load_config_file(config_spec)
  for dotted, value in overrides:
    apply_override(config, dotted, value)
  return config, workdir


def main(argv: list[str] | None = None) -> int:
  # Installed before JAX is imported: a SIGTERM during start-up stops the run cleanly.
  with errors.DeferredInterrupt("train.py") as stop:
    try:
      config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
      print(f"error: {e} (see python train.py --help)", file=sys.stderr)
      return errors.EXIT_USAGE
    from molmo_jax.training import loop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax narrates every save at INFO
    try:
      result = loop.train(config, workdir, stop=stop)
    except loop.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      return errors.EXIT_NONFINITE
  how = "stopped by signal" if result.stopped_by_signal else "finished"
  logging.getLogger("molmo_jax.train").info("%s at step %d", how, result.step)
  return 0


if __name__ == "__main__":
  if {"-h", "--help"} & set(sys.argv[1:]):
    print(f"{__doc__}\n{errors.EXIT_CODES_HELP}")
    sys.exit(0)
  sys.exit(errors.run_main(main))
