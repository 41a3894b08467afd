"""The error convention itself (molmo_jax/errors.py): classification, one line, --debug."""

from __future__ import annotations

import errno

import pytest

from molmo_jax import errors


def _raise(exc):
  def main(argv):
    del argv
    raise exc
  return main


@pytest.mark.parametrize("exc,code,text", [
    (errors.UserError("--flag", "expected >= 1, got 0", "give a positive number"), 2,
     "--flag: expected >= 1, got 0 (give a positive number)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such/ckpt"), 2,
     "/no/such/ckpt: No such file or directory"),
    (ValueError("data.jsonl:3: field points: expected finite numbers"), 2, "data.jsonl:3"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/disk/file"), 4,
     "/full/disk/file: No space left on device (free disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 4, "/ro/out: Permission denied"),
    # tensorstore reports file-system errors as ValueErrors carrying the strerror text
    (ValueError("Error writing local file \"/x/d/abc\": No space left on device"), 4,
     "No space left on device"),
    (errors.StorageError("/m", "checkpoint data unreadable: truncated"), 4, "/m: checkpoint data"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_exception_classes_map_to_the_exit_code_table(exc, code, text, capfd):
  got = errors.run_main(_raise(exc), [])
  err = capfd.readouterr().err
  assert got == code
  first = err.splitlines()[0]
  assert first.startswith("error: ") and text in first, err
  assert "Traceback" not in err


def test_storage_error_names_the_root_cause_first(capfd):
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/run/checkpoints/4/params")
    except OSError as inner:
      raise RuntimeError("Event loop is closed") from inner
  except RuntimeError as outer:
    exc = outer
  assert errors.run_main(_raise(exc), []) == errors.EXIT_STORAGE
  first = capfd.readouterr().err.splitlines()[0]
  assert first.startswith("error: /run/checkpoints/4/params: No space left on device"), first


def test_internal_errors_exit_70_with_the_traceback(capfd):
  assert errors.run_main(_raise(RuntimeError("boom")), []) == errors.EXIT_INTERNAL
  err = capfd.readouterr().err
  assert err.startswith("error: internal error (RuntimeError: boom)")
  assert "Traceback" in err


def test_debug_flag_and_environment_show_the_traceback(capfd, monkeypatch):
  seen = []

  def main(argv):
    seen.append(argv)
    raise errors.UserError("--x", "bad")

  assert errors.run_main(main, ["--debug", "--x", "1"]) == 2
  assert seen == [["--x", "1"]]                 # --debug never reaches the tool's parser
  assert "Traceback" in capfd.readouterr().err
  monkeypatch.setenv(errors.DEBUG_ENV, "1")
  assert errors.run_main(main, []) == 2
  assert "Traceback" in capfd.readouterr().err


def test_argument_parser_errors_are_one_line_and_help_lists_exit_codes(capfd):
  parser = errors.ArgumentParser(prog="tool")
  parser.add_argument("--n", type=int, required=True)
  assert errors.run_main(lambda argv: parser.parse_args(argv) and 0, ["--n", "x"]) == 2
  err = capfd.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: tool: argument --n")
  assert errors.run_main(lambda argv: parser.parse_args(argv) and 0, ["--help"]) == 0
  out = capfd.readouterr().out
  for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "70 ", "130 "):
    assert f"\n  {code}" in out


def test_writable_output_is_checked_before_work(tmp_path):
  with pytest.raises(errors.UserError, match="does not exist"):
    errors.writable_output(tmp_path / "missing" / "x.png", "--draw")
  errors.writable_output(tmp_path / "x.png", "--draw")
  with pytest.raises(errors.UserError, match="is a directory"):
    errors.writable_output(tmp_path, "--draw")
