"""One error convention for every command-line tool (train, eval, aot, predict, convert.*, serve).

A tool's `main` is wrapped by `run_main`, which turns what escapes it into one line on stderr

    error: <what>: <why> (<what to do>)

and an exit code from this table (also appended to every tool's --help as EXIT_CODES_HELP):

    0    success (train.py: finished, or stopped by SIGTERM/SIGINT after saving a checkpoint)
    1    train.py: the loss became NaN/Inf; the last good checkpoint is kept
    2    user error: a bad flag, config value or input file, a path that is not a checkpoint,
         a missing optional package (e.g. libtpu for aot.py)
    3    aot.py: the step compiled but does not fit in the accelerator's memory
    4    storage error: disk full, permission denied, read-only or failing file system,
         truncated or corrupt checkpoint data (the root cause is printed first)
    70   internal error: a bug; the traceback is printed, please report it
    130  interrupted (Ctrl-C / SIGTERM) where no safe stop was possible; nothing half-written is
         left at the output path

`--debug` anywhere on the command line (removed before the tool parses its flags) or
MOLMO_JAX_DEBUG=1 prints the full traceback after the line.

Library code raises `UserError` / `StorageError` (or the ValueError / FileNotFoundError /
OSError it always raised: they are classified here); it never prints or exits itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Sequence

EXIT_OK = 0
EXIT_NONFINITE = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3
EXIT_STORAGE = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MOLMO_JAX_DEBUG"

EXIT_CODES_HELP = """\
Exit status:
  0    success (train.py: finished, or stopped by SIGTERM/SIGINT after saving)
  1    train.py: loss became NaN/Inf (the last good checkpoint is kept)
  2    user error: bad flag, config value, input file, or a path that is not a checkpoint
  3    aot.py: compiled, but does not fit in accelerator memory
  4    storage error: disk full, permission denied, truncated/corrupt checkpoint data
  70   internal error (a bug: the traceback is printed)
  130  interrupted before a safe stop (nothing half-written is left at the output)
Errors are one line on stderr: `error: <what>: <why> (<what to do>)`. --debug (or
MOLMO_JAX_DEBUG=1) adds the traceback. See docs/reliability.md."""

# errno values that mean "the storage failed us", not "you named the wrong thing".
_STORAGE_ERRNOS = frozenset(e for e in (
    errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG,
    getattr(errno, "EDQUOT", None), getattr(errno, "ESTALE", None)) if e is not None)
# Substrings of tensorstore / zarr / orbax messages about unreadable stored data.
_CORRUPT_MARKERS = ("DATA_LOSS", "Error reading", "Error decoding", "Unexpected end of",
                    "truncated", "Invalid chunk", "corrupt", "checksum", "Malformed",
                    "Failed to decode", "not a valid", "OUT_OF_RANGE")
# Status prefixes of tensorstore errors about stored bytes (any tool reading a checkpoint).
_TENSORSTORE_MARKERS = ("DATA_LOSS:", "OUT_OF_RANGE: Error reading", "Error reading", "Error decoding")


class ToolError(Exception):
  """An error with a message meant for the user: `what: why (hint)`."""

  exit_code = EXIT_USAGE

  def __init__(self, what: str, why: str = "", hint: str = ""):
    self.what, self.why, self.hint = str(what), str(why), str(hint)
    super().__init__(self.line())

  def line(self) -> str:
    text = f"{self.what}: {self.why}" if self.why else self.what
    return f"{text} ({self.hint})" if self.hint else text


class UserError(ToolError, ValueError):
  """Bad input from the user (flag, config value, file, path). Exit 2."""

  exit_code = EXIT_USAGE


class StorageError(ToolError, OSError):
  """The file system failed or stored data is unreadable (truncated/corrupt). Exit 4."""

  exit_code = EXIT_STORAGE


class Interrupted(ToolError):
  """A deferred SIGINT/SIGTERM raised at a safe point. Exit 130."""

  exit_code = EXIT_INTERRUPTED


def _chain(exc: BaseException) -> list[BaseException]:
  """exc, its cause, the cause's cause, ... (explicit causes first, then implicit context)."""
  seen, out = set(), []
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    out.append(exc)
    exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
  return out


def root_cause(exc: BaseException) -> BaseException:
  return _chain(exc)[-1]


def _storage_os_error(exc: BaseException) -> OSError | None:
  """The OSError of a failing file system in the chain; tensorstore reports them as ValueErrors
  whose message carries the strerror text, which is recognised too."""
  chain = _chain(exc)
  for e in chain:
    if isinstance(e, OSError) and not isinstance(e, ToolError) and e.errno in _STORAGE_ERRNOS:
      return e
  for e in chain:
    for code in _STORAGE_ERRNOS:
      if os.strerror(code) in str(e):
        return OSError(code, f"{os.strerror(code)} ({_first_line(str(e))})")
  return None


def _first_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[0] if lines else ""


def _os_error_line(e: OSError) -> str:
  name = e.filename or ""
  reason = e.strerror or _first_line(str(e)) or type(e).__name__
  return f"{name}: {reason}" if name else reason


_STORAGE_HINTS = {
    errno.ENOSPC: "free disk space or write elsewhere, then rerun the same command",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "write to a writable file system",
}


def classify(exc: BaseException) -> tuple[int, str]:
  """(exit code, the one line after 'error: ') for an exception that escaped a tool's main."""
  if isinstance(exc, KeyboardInterrupt):
    return EXIT_INTERRUPTED, "interrupted (nothing half-written was left at the output path)"
  if isinstance(exc, ToolError):
    return exc.exit_code, exc.line()
  storage = _storage_os_error(exc)
  if storage is not None:
    hint = _STORAGE_HINTS.get(storage.errno, "check the disk and rerun the same command")
    outer = _first_line(str(exc)) if exc is not storage else ""
    line = f"{_os_error_line(storage)} ({hint})"
    return EXIT_STORAGE, line if not outer or outer in line else f"{line}; while: {outer}"
  for e in _chain(exc):
    if isinstance(e, ToolError):
      return e.exit_code, e.line()
  for e in _chain(exc):
    if any(marker in str(e) for marker in _TENSORSTORE_MARKERS):
      return EXIT_STORAGE, (f"{_first_line(str(e))} (stored data truncated or corrupt; copy or "
                            "convert it again)")
  if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)):
    return EXIT_USAGE, _os_error_line(exc) if exc.filename else _first_line(str(exc))
  if isinstance(exc, OSError):
    return EXIT_STORAGE, _os_error_line(exc)
  # A bare KeyError('name') is a bug; one with a sentence describes bad data.
  described_key = (isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str)
                   and " " in exc.args[0])
  if (isinstance(exc, ValueError) and not isinstance(exc, UnicodeError)) or described_key:
    # The library's convention: ValueError names the field / file and what was expected.
    message = _first_line(exc.args[0] if described_key else str(exc))
    return EXIT_USAGE, message or type(exc).__name__
  if isinstance(exc, UnicodeError):
    return EXIT_USAGE, _first_line(str(exc))
  return EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {_first_line(str(exc))}); " \
                        "this is a bug, please report it with the traceback below"


def looks_like_bad_data(exc: BaseException) -> bool:
  """Whether an exception chain reports unreadable stored bytes (tensorstore / zarr / orbax)."""
  return any(marker.lower() in str(e).lower() for e in _chain(exc) for marker in _CORRUPT_MARKERS)


def unreadable_data(where: str, exc: BaseException) -> ToolError:
  """The error to raise when reading a checkpoint failed: storage (root cause first) when the
  file system failed or the bytes are bad, else the user error already in the chain."""
  for e in _chain(exc):
    if isinstance(e, ToolError):
      return e
  storage = _storage_os_error(exc)
  if storage is not None:
    return StorageError(where, _os_error_line(storage), "check the disk and permissions")
  messages = [e for e in _chain(exc) if any(m.lower() in str(e).lower() for m in _CORRUPT_MARKERS)]
  cause = messages[-1] if messages else root_cause(exc)
  why = _first_line(str(cause)) or type(cause).__name__
  if isinstance(cause, FileNotFoundError):
    return StorageError(where, f"checkpoint file missing: {_os_error_line(cause)}",
                        "the checkpoint is incomplete; copy or convert it again")
  return StorageError(where, f"checkpoint data unreadable: {why}",
                      "the files are truncated or corrupt; copy or convert the checkpoint again")


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def strip_debug(argv: Sequence[str]) -> list[str]:
  return [a for a in argv if a != DEBUG_FLAG]


def report(exc: BaseException, debug: bool, stream=None) -> int:
  """Prints the one-line error (and, with debug or for internal errors, the traceback)."""
  stream = stream or sys.stderr
  code, line = classify(exc)
  print(f"error: {line}", file=stream, flush=True)
  if debug or code == EXIT_INTERNAL:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
  elif code == EXIT_STORAGE and not isinstance(exc, ToolError):
    print(f"(run again with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the full traceback)", file=stream)
  return code


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """Calls main(argv without --debug) and maps what escapes it to the exit-code table.

  argparse's own exits (--help, usage errors via `ArgumentParser`) pass through unchanged.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  # Orbax logs a failing background write with its traceback (through absl), asyncio logs its
  # failed tasks ("Task exception was never retrieved"), and tensorstore's callbacks print
  # "Event loop is closed" once orbax's loop is gone: all repeat the exception the one-line report
  # states, root cause first. Without --debug they are hidden, also while the process exits.
  for name, quiet in _QUIET.items():
    if debug:
      logging.getLogger(name).removeFilter(quiet)
    else:
      logging.getLogger(name).addFilter(quiet)
  if not debug and not getattr(sys.excepthook, "_molmo_quiet", False):
    sys.excepthook = _skip_closed_loop(sys.excepthook)
    sys.unraisablehook = _skip_closed_loop_unraisable(sys.unraisablehook)
  try:
    code = main(strip_debug(argv))
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(f"error: {e.code}", file=sys.stderr)
    return EXIT_USAGE
  except BaseException as e:  # noqa: BLE001 - this is the one place errors become exit codes
    code = report(e, debug)
  sys.stdout.flush()
  return 0 if code is None else int(code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The tool's docstring as written, and every flag's default in --help (unless its help text
  already says what the default is)."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text.lower() or action.default is argparse.SUPPRESS or action.required:
      return text
    if action.option_strings and not isinstance(action, (argparse._StoreTrueAction,
                                                         argparse._StoreFalseAction)):
      return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
    return text
def _is_closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _skip_closed_loop(hook):
  def excepthook(kind, value, tb):
    if not _is_closed_loop(value):
      hook(kind, value, tb)
  excepthook._molmo_quiet = True
  return excepthook


def _skip_closed_loop_unraisable(hook):
  def unraisablehook(info):
    if not _is_closed_loop(info.exc_value):
      hook(info)
  return unraisablehook


class _QuietLibraryErrors(logging.Filter):
  """Drops library ERROR records (with their tracebacks) that duplicate the exception."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


class _QuietStorageTasks(logging.Filter):
  """Drops asyncio's reports of failed checkpoint-I/O tasks (other asyncio errors stay)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = f"{record.getMessage()} {exc or ''}"
    storage = any(os.strerror(code) in text for code in _STORAGE_ERRNOS)
    return not (storage or any(marker in text for marker in _TENSORSTORE_MARKERS + ("Error writing",)))


_QUIET = {"absl": _QuietLibraryErrors(), "asyncio": _QuietStorageTasks()}


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line usage errors (`error: <prog>: <message> (see --help)`), exit 2,
  and the exit-code table at the end of --help."""

  def __init__(self, *args, **kwargs):
    epilog = kwargs.pop("epilog", None)
    kwargs["epilog"] = f"{epilog}\n\n{EXIT_CODES_HELP}" if epilog else EXIT_CODES_HELP
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


# ------------------------------------------------------------------------------------------
# Validation helpers shared by the tools
# ------------------------------------------------------------------------------------------

def at_least(value, minimum, name: str):
  """Returns value, or raises UserError naming the flag when value < minimum."""
  if value is not None and value < minimum:
    raise UserError(name, f"expected >= {minimum}, got {value}")
  return value


def writable_output(path: str | os.PathLike, name: str, make_parents: bool = False) -> None:
  """Refuses (before any work) an output file path whose folder is missing or not writable."""
  from pathlib import Path
  path = Path(path)
  parent = path.absolute().parent
  if path.is_dir():
    raise UserError(f"{name} {path}", "is a directory", "give a file path")
  if not parent.is_dir():
    if make_parents:
      ancestor = parent
      while not ancestor.exists():
        ancestor = ancestor.parent
      if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path}", f"cannot create its folder under {ancestor}",
                        "choose a writable location")
      return
    raise UserError(f"{name} {path}", f"folder {parent} does not exist", "create it first")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{name} {path}", f"folder {parent} is not writable",
                    "choose a writable location")
  if path.exists() and not os.access(path, os.W_OK):
    raise UserError(f"{name} {path}", "exists and is not writable", "choose another path")


# ------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------

class DeferredInterrupt:
  """SIGINT/SIGTERM set a flag instead of raising inside C++ threads (tensorstore, XLA), which
  aborts the process with `FATAL: exception not rethrown`; `check()` raises Interrupted at safe
  points. A second SIGINT raises KeyboardInterrupt at once."""

  def __init__(self, what: str = "interrupted"):
    self.what = what
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame):
    del frame
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum

  def check(self) -> None:
    if self.received is not None:
      raise Interrupted(self.what, f"{signal.Signals(self.received).name} received",
                        "nothing was written to the output; rerun the command")

  def __enter__(self) -> "DeferredInterrupt":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_interrupt(what: str) -> Iterator[DeferredInterrupt]:
  with DeferredInterrupt(what) as flag:
    # A signal after the last check arrived once the work was committed: the result stands.
    yield flag
