"""Command lines that take a recipe: absl flags + ml_collections.config_flags (train.py, aot.py).

    python train.py --config configs/tiny_test.py:qwen2 --config.total_steps=20 --workdir runs/t

`--config FILE[:ARG]` loads FILE's get_config(ARG); `--config.a.b=VALUE` overrides one field
(the value is parsed as the field's type; a misspelt field is an error naming it, with a
suggestion); `--flagfile FILE` reads flags from a file. `--help` prints the tool's flags with their
defaults and, when --config is given too, every field of that recipe with its value.

Usage errors print one line and exit with status 2; `--help` exits with 0.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator, Sequence

from absl import flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
USAGE_EXIT = 2


class UsageError(ValueError):
  """A command-line problem; the tool prints it as one line and exits with status 2."""


def define_config(flag_values: flags.FlagValues = flags.FLAGS, name: str = "config",
                  help_text: str = "recipe file[:arg] whose get_config(arg) returns the run's "
                  "ConfigDict; override fields with --config.<field>=value") -> flags.FlagHolder:
  from ml_collections import config_flags
  return config_flags.DEFINE_config_file(name, None, help_text, flag_values=flag_values,
                                         lock_config=True)


@contextlib.contextmanager
def _argv_as(argv: Sequence[str]) -> Iterator[None]:
  # config_flags finds --config.* overrides in sys.argv; make in-process calls (tests,
  # entry points) see the argv being parsed.
  saved = sys.argv
  sys.argv = list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def _clean(error: BaseException) -> str:
  """One line from an absl / config_flags / ConfigDict error."""
  text = str(error).strip()
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if typo:
    return f"no such config field {typo.group(2)!r} (did you mean {typo.group(1)!r}?)"
  if isinstance(error, (AttributeError, KeyError)):
    field = re.search(r"([A-Za-z0-9_]+)", text)
    return f"no such config field {field.group(1)!r}" if field else text
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    return f"--config: no such file {missing.group(1)!r}"
  if "Traceback" in text:      # get_config(arg) raised: its own message is the last line
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return f"--config: {last}"
  return re.sub(r"\s+", " ", text)


def _recipe_error(config) -> str | None:
  """config_flags keeps a recipe that failed to load as an object that raises on use."""
  if getattr(type(config), "__name__", "") != "_ErrorConfig":
    return None
  return _clean(object.__getattribute__(config, "_error"))


def usage(prog: str, doc: str, holders: Sequence[flags.FlagHolder],
          flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The tool's docstring, then each flag with its help and default."""
  lines = [doc.strip(), "", "flags:"]
  for holder in holders:
    flag = flag_values[holder.name]
    default = flag.default_as_str if flag.default is not None else "none"
    if holder.name == "config" and flag.default is None:
      default = "required"
    lines.append(f"  --{flag.name}: {flag.help}")
    lines.append(f"      (default: {default})")
  lines.append("  --flagfile: read more flags from a file, one per line")
  lines.append("  -h, --help: this message (with --config: every field of that recipe and its value)")
  return "\n".join(lines)


def parse(argv: Sequence[str], prog: str, doc: str, holders: Sequence[flags.FlagHolder],
          flag_values: flags.FlagValues = flags.FLAGS, recipe_help: bool = True) -> list[str]:
  """Parses `argv` (argv[0] is the program) into `flag_values`; returns the positional rest.

  --help: prints `usage` (and the resolved recipe when --config is given) and exits with 0.
  Raises UsageError with a one-line message for any parse problem.
  """
  argv = [prog, *argv[1:]]
  wants_help = any(a in HELP_FLAGS for a in argv[1:])
  args = [a for a in argv if a not in HELP_FLAGS]
  flag_values.unparse_flags()
  for name in [n for n in flag_values if n.startswith("config.")]:
    delattr(flag_values, name)     # override flags of an earlier parse (tests parse repeatedly)
  try:
    with _argv_as(args):
      rest = flag_values(args, known_only=False)
  except flags.Error as e:
    if wants_help:
      print(usage(prog, doc, holders, flag_values))
      sys.exit(0)
    raise UsageError(_clean(e)) from None
  except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError, SyntaxError) as e:
    if wants_help:
      print(usage(prog, doc, holders, flag_values))
      sys.exit(0)
    raise UsageError(_clean(e)) from None
  config = flag_values["config"].value if "config" in flag_values else None
  problem = _recipe_error(config) if config is not None else None
  if problem and not wants_help:
    raise UsageError(problem)
  if wants_help:
    print(usage(prog, doc, holders, flag_values))
    if recipe_help and config is not None and not problem:
      print("\nrecipe fields (--config.<field>=value):")
      print("  " + str(config).rstrip().replace("\n", "\n  "))
    sys.exit(0)
  if len(rest) > 1:
    raise UsageError(f"unexpected argument(s) {rest[1:]}; flags look like --name=value")
  return rest


def require(holders: Sequence[flags.FlagHolder]) -> None:
  missing = [f"--{h.name}" for h in holders if h.value is None]
  if missing:
    raise UsageError(f"missing required flag(s): {', '.join(missing)} (see --help)")
