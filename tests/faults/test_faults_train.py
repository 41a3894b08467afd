"""train.py faults: kills and signals at bad moments, two runs in one workdir, a resume of another
job, bad JSONL values and images, bad config values, disk full.

Every run is a real `python train.py --config configs/tiny_test.py` subprocess on one CPU device;
all share one persistent compilation cache, so only the reference run compiles. Runs that fail on
their input stop before compiling.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, tool_env, tree_hash
from PIL import Image

import numpy as np

TOTAL = 4
TIMEOUT = 600


def launch(workdir: Path, cache: Path, *overrides: str, config: str = "configs/tiny_test.py",
           **popen) -> subprocess.Popen:
  cmd = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir),
         f"--config.total_steps={TOTAL}", "--config.checkpoint.save_every=2",
         f"--config.compilation_cache_dir={cache}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
  out, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, err + out      # stderr first: its first line is the error


def metric_rows(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
  rows = metric_rows(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"duplicate or unordered metric rows: {steps}"
  return {r["step"]: r["loss"] for r in rows}


def complete_steps(workdir: Path) -> list[int]:
  root = workdir / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def leftovers(workdir: Path) -> list[str]:
  root = workdir / "checkpoints"
  return [p.name for p in root.iterdir() if "tmp" in p.name] if root.is_dir() else []


def wait_for(predicate, proc: subprocess.Popen, what: str, poll: float = 0.005):
  start = time.monotonic()
  while time.monotonic() - start < TIMEOUT:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited ({proc.returncode}) before {what}:\n"
                           + "".join(proc.communicate())[-4000:])
    time.sleep(poll)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  """The uninterrupted reference run (it also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp("straight")
  code, out = finish(launch(workdir, cache))
  assert code == 0, out[-4000:]
  assert complete_steps(workdir) == [2, 4] and sorted(losses(workdir)) == [1, 2, 3, 4]
  return workdir


# ------------------------------------------------------------------------------------------
# Kills and signals
# ------------------------------------------------------------------------------------------

def test_kill_during_save_then_sigterm_at_start_then_resume_is_exact(straight, cache, tmp_path):
  # 1. SIGKILL while a checkpoint is being written.
  proc = launch(tmp_path, cache, "--config.checkpoint.save_every=1", "--config.debug_step_sleep_s=0.3")
  root = tmp_path / "checkpoints"

  def save_in_flight():
    if not complete_steps(tmp_path):
      return None                              # let one save complete first
    return [p.name for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name] or None

  wait_for(save_in_flight, proc, "an in-flight save", poll=0.002)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  survivors = complete_steps(tmp_path)
  assert survivors and survivors[-1] < TOTAL
  assert (tmp_path / ".lock").read_text().startswith("pid ")    # the dead run's lock stays

  # 2. SIGTERM right after start (during imports, before anything compiled): a clean stop that
  #    takes over the dead run's lock and leaves the checkpoints as they were.
  proc = launch(tmp_path, cache)
  time.sleep(2.0)
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 0, out[-4000:]
  assert "Traceback" not in out and "stopped" in out
  assert "taking over a lock left by a run that is gone" in out
  assert complete_steps(tmp_path)[-1] >= survivors[-1]

  # 3. Resume with a harmless change (log_every): reported, allowed, exact.
  code, out = finish(launch(tmp_path, cache, "--config.log_every=3"))
  assert code == 0, out[-4000:]
  assert "resuming with changed settings: log_every: 1 -> 3" in out or \
         "resuming with changed settings: log_every" in out
  assert losses(tmp_path) == losses(straight)                   # bit-identical, one row per step
  assert len(metric_rows(tmp_path)) == TOTAL
  assert leftovers(tmp_path) == []


def test_second_run_in_a_locked_workdir_is_refused(cache, tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys\nfrom molmo_jax.training.workdir import WorkdirLock\n"
       f"with WorkdirLock({str(tmp_path)!r}):\n  print('locked', flush=True)\n  sys.stdin.read()"],
      cwd=REPO, env=tool_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = tree_hash(tmp_path, exclude=(".lock",))
    code, out = finish(launch(tmp_path, cache))
    assert_one_line_error(code, out, 2, f"--workdir {tmp_path}", "another training run holds it",
                          f"pid {holder.pid}")
    assert tree_hash(tmp_path, exclude=(".lock",)) == before
  finally:
    holder.communicate(input="", timeout=60)


@pytest.mark.parametrize("override,message,field", [
    ("--config.model.llm.num_layers=3", "its checkpoints are of another model", "llm.num_layers"),
    ("--config.data.seq_len=128", "another model or data config", "data.seq_len"),
])
def test_resume_with_another_model_or_data_config_is_refused_untouched(
    straight, cache, tmp_path, override, message, field):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  before = tree_hash(workdir, exclude=(".lock",))
  code, out = finish(launch(workdir, cache, override))
  assert_one_line_error(code, out, 2, f"--workdir {workdir}", message, field)
  assert tree_hash(workdir, exclude=(".lock",)) == before       # model_config.json included


# ------------------------------------------------------------------------------------------
# Bad input and config values (refused before compiling)
# ------------------------------------------------------------------------------------------

_JSONL_CONFIG = """
from configs.tiny_test import get_config as tiny


def get_config(arg=None):
  c = tiny()
  c.data.sources = {{"mine": dict(kind="jsonl", path={path!r})}}
  return c
"""


def _jsonl_run(tmp_path: Path, cache: Path, lines: list[str]) -> tuple[Path, int, str]:
  Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  manifest = tmp_path / "data.jsonl"
  manifest.write_text("".join(line + "\n" for line in lines))
  config = tmp_path / "config.py"
  config.write_text(_JSONL_CONFIG.format(path=str(manifest)))
  before = tree_hash(manifest, tmp_path / "ok.png", tmp_path / "bad.png")
  code, out = finish(launch(tmp_path / "run", cache, config=str(config)))
  assert tree_hash(manifest, tmp_path / "ok.png", tmp_path / "bad.png") == before
  return manifest, code, out


_OK = '{"image": "ok.png", "messages": ["Describe the image.", "A grey square."]}'


@pytest.mark.parametrize("bad,field", [
    ('{"image": "ok.png", "messages": ["Describe.", "Grey."], "weight": 1e400}', "weight"),
    ('{"image": "ok.png", "question": "Point to the box", "points": [[NaN, 3]], "label": "box", '
     '"task": "pointing"}', "points"),
])
def test_non_finite_jsonl_values_name_file_and_line(bad, field, cache, tmp_path):
  manifest, code, out = _jsonl_run(tmp_path, cache, [_OK, bad])
  assert_one_line_error(code, out, 2, f"{manifest}:2", field)


def test_corrupt_image_in_training_names_the_jsonl_line(cache, tmp_path):
  bad = '{"image": "bad.png", "messages": ["Describe the image.", "A grey square."]}'
  manifest, code, out = _jsonl_run(tmp_path, cache, [bad, bad])
  line = assert_one_line_error(code, out, 2, f"{manifest}:", "bad.png")
  assert "cannot decode" in line


@pytest.mark.parametrize("override,names", [
    ("--config.optimizer.llm.warmup_steps=-1", ("optimizer.llm", "warmup")),
    ("--config.model.llm.d_modle=64", ("d_modle",)),
    ("--config.total_steps=0", ("total_steps",)),
])
def test_bad_config_values(override, names, cache, tmp_path):
  code, out = finish(launch(tmp_path / "run", cache, override))
  assert_one_line_error(code, out, 2, *names)


# ------------------------------------------------------------------------------------------
# Storage
# ------------------------------------------------------------------------------------------

def _limit_file_size(limit: int):
  def apply():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # writes past the limit fail with EFBIG
  return apply


def test_disk_full_during_a_checkpoint_is_a_storage_error_not_a_nan_stop(straight, cache, tmp_path):
  code, out = finish(launch(tmp_path, cache, preexec_fn=_limit_file_size(200 * 1024)))
  assert_one_line_error(code, out, 4, "File too large")
  assert len(out.splitlines()) < 40, out[-4000:]
  # The failed save never became a step (its temporary folder is removed by the next start).
  assert complete_steps(tmp_path) == []
