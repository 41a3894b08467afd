"""Converters never lose data: output/source overlap refused, --overwrite vs --force, staging,
leftovers of killed conversions, Ctrl-C, disk full, truncated checkpoint data."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (REPO, assert_one_line_error, run_in_process, run_tool, tool_env, tree_hash)

from convert import hf_to_orbax, orbax_to_hf
from molmo_jax.output_dirs import is_model_directory, is_release_directory


def _leftovers(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
  """A private copy of the tiny model inside a parent folder with a sibling file."""
  parent = tmp_path / "models"
  shutil.copytree(tiny_model, parent / "model")
  (parent / "notes.txt").write_text("sibling file that must survive\n")
  return parent / "model"


@pytest.fixture
def release(tiny_release, tmp_path) -> Path:
  shutil.copytree(tiny_release, tmp_path / "hf")
  return tmp_path / "hf"


def test_export_into_the_parent_of_the_model_is_refused(model, capfd):
  # The reported data loss: orbax_to_hf MODEL PARENT_OF_MODEL --overwrite deleted the model.
  before = tree_hash(model.parent)
  code, err = run_in_process(orbax_to_hf.main, [str(model), str(model.parent), "--overwrite"], capfd)
  assert_one_line_error(code, err, 2, str(model.parent), "contains the source")
  assert tree_hash(model.parent) == before


def test_import_onto_its_own_source_is_refused(release, capfd):
  before = tree_hash(release)
  code, err = run_in_process(hf_to_orbax.main, [str(release), str(release), "--overwrite"], capfd)
  assert_one_line_error(code, err, 2, str(release), "is the source itself")
  assert tree_hash(release) == before


def test_output_inside_the_source_is_refused(release, capfd):
  before = tree_hash(release)
  code, err = run_in_process(hf_to_orbax.main, [str(release), str(release / "sub")], capfd)
  assert_one_line_error(code, err, 2, str(release / "sub"), "inside the source")
  assert tree_hash(release) == before and not (release / "sub").exists()


def test_overwrite_replaces_only_a_checkpoint_and_force_anything(release, tmp_path, capfd):
  other = tmp_path / "photos"
  other.mkdir()
  (other / "holiday.jpg").write_bytes(b"not a checkpoint")
  before = tree_hash(release, other)
  code, err = run_in_process(hf_to_orbax.main, [str(release), str(other), "--overwrite"], capfd)
  assert_one_line_error(code, err, 2, str(other), "not a model directory", "--force")
  assert tree_hash(release, other) == before
  code, err = run_in_process(hf_to_orbax.main, [str(release), str(other)], capfd)
  assert_one_line_error(code, err, 2, str(other), "already exists", "--overwrite")
  # --force replaces it; then --overwrite replaces the model directory it has become.
  assert run_in_process(hf_to_orbax.main, [str(release), str(other), "--force"], capfd)[0] == 0
  assert is_model_directory(other) and not (other / "holiday.jpg").exists()
  assert run_in_process(hf_to_orbax.main, [str(release), str(other), "--overwrite"], capfd)[0] == 0
  assert is_model_directory(other) and _leftovers(tmp_path) == []
  # the same rule on export: a model directory is not a release directory
  code, err = run_in_process(orbax_to_hf.main, [str(other), str(release), "--overwrite"], capfd)
  assert code == 0 and is_release_directory(release)
  before = tree_hash(release, other)
  code, err = run_in_process(orbax_to_hf.main, [str(other), str(other.parent / "x"), "--overwrite"],
                             capfd)
  assert code == 0
  shutil.copytree(other, tmp_path / "model2")          # a model directory to export from
  code, err = run_in_process(orbax_to_hf.main, [str(tmp_path / "model2"), str(other), "--overwrite"],
                             capfd)
  assert_one_line_error(code, err, 2, str(other), "not a release (HF) directory")
  assert tree_hash(release, other) == before


def test_missing_source_and_file_target_are_user_errors(release, tmp_path, capfd):
  code, err = run_in_process(hf_to_orbax.main, [str(tmp_path / "nope"), str(tmp_path / "o")], capfd)
  assert_one_line_error(code, err, 2, str(tmp_path / "nope"))
  target = tmp_path / "file.bin"
  target.write_bytes(b"x")
  code, err = run_in_process(hf_to_orbax.main, [str(release), str(target), "--overwrite"], capfd)
  assert_one_line_error(code, err, 2, str(target), "not a directory")
  assert target.read_bytes() == b"x"


def test_truncated_params_are_a_storage_error_named_first(model, tmp_path, capfd):
  chunks = sorted((model / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
  biggest = chunks[-1]
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  before = tree_hash(model.parent)
  code, err = run_in_process(orbax_to_hf.main, [str(model), str(tmp_path / "out")], capfd)
  assert_one_line_error(code, err, 4, str(model), "checkpoint data unreadable")
  assert tree_hash(model.parent) == before
  assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Subprocesses: kills, Ctrl-C, disk full
# ------------------------------------------------------------------------------------------

# The tiny conversion takes a fraction of a second; the wrapper sleeps between tensors so a
# signal lands mid-conversion (the tool itself is unchanged).
_SLOW = """
import sys, time
import convert.{module} as m
from molmo_jax import errors
cls = m.{reader}
original = cls.read
def slow(self, *args, **kwargs):
  time.sleep(0.05)
  return original(self, *args, **kwargs)
cls.read = slow
sys.exit(errors.run_main(m.main, sys.argv[1:]))
"""
_READERS = {"hf_to_orbax": "SafetensorsDir", "orbax_to_hf": "OrbaxParams"}


def _slow_conversion(module: str, args: list[str]) -> subprocess.Popen:
  code = _SLOW.format(module=module, reader=_READERS[module])
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=tool_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(parent: Path, proc: subprocess.Popen, inner: str, timeout: float = 300):
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    partial = [p for p in parent.iterdir() if ".partial-" in p.name]
    if partial and (not inner or list(partial[0].rglob(inner))):
      return partial[0]
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.01)
  proc.kill()
  raise AssertionError("no staging folder appeared")


def test_sigkill_mid_conversion_leaves_a_partial_the_next_conversion_removes(release, tmp_path):
  out = tmp_path / "converted"
  proc = _slow_conversion("hf_to_orbax", [str(release), str(out)])
  partial = _wait_for_partial(tmp_path, proc, inner="ocdbt.process_0")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert partial.exists() and not out.exists()           # killed: only the hidden staging folder
  before = tree_hash(release)
  done = run_tool(["-m", "convert.hf_to_orbax", str(release), str(out)])
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"removed {partial}" in done.stderr
  assert _leftovers(tmp_path) == [] and is_model_directory(out)
  assert tree_hash(release) == before


@pytest.mark.parametrize("module,source_kind", [("hf_to_orbax", "release"),
                                                ("orbax_to_hf", "model")])
def test_ctrl_c_late_in_a_conversion_stops_cleanly(module, source_kind, release, model, tmp_path):
  source = release if source_kind == "release" else model
  out = tmp_path / "out"
  before = tree_hash(source)
  proc = _slow_conversion(module, [str(source), str(out)])
  # "late": the staging folder already holds written tensors
  _wait_for_partial(tmp_path, proc,
                    inner="ocdbt.process_0" if module == "hf_to_orbax" else "*.safetensors")
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert_one_line_error(proc.returncode, err, 130, "conversion interrupted", "SIGINT")
  assert not out.exists() and _leftovers(tmp_path) == []
  assert tree_hash(source) == before


def _limit_file_size(limit: int):
  def apply():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # writes past the limit fail with EFBIG
  return apply


def test_disk_full_during_conversion_is_a_storage_error_and_leaves_nothing(release, tmp_path):
  out = tmp_path / "out"
  before = tree_hash(release)
  done = run_tool(["-m", "convert.hf_to_orbax", str(release), str(out)],
                  preexec_fn=_limit_file_size(64 * 1024))
  assert_one_line_error(done.returncode, done.stderr, 4, "File too large")
  assert not out.exists() and _leftovers(tmp_path) == []
  assert tree_hash(release) == before
