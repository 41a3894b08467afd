"""In-process pieces of the promises (fast): leftovers of killed runs, metrics trimming, the
resume config check, the lock, the staging swap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from molmo_jax import output_dirs
from molmo_jax.errors import UserError
from molmo_jax.training import workdir as workdir_lib


def _leftover(parent, name, kind, pid):
  path = parent / f".{name}.{kind}-{output_dirs._host()}-{pid}-abcdef12"
  path.mkdir()
  (path / "params").mkdir()
  return path


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path, caplog):
  target = tmp_path / "model"
  dead = _leftover(tmp_path, "model", "partial", _dead_pid())
  live = _leftover(tmp_path, "model", "partial", os.getppid())         # a running process
  other = _leftover(tmp_path, "other", "partial", _dead_pid())         # another target
  parked = _leftover(tmp_path, "model", "old", _dead_pid())            # target missing: keep
  removed = output_dirs.clean_leftovers(target)
  assert removed == [dead] and not dead.exists()
  assert live.exists() and other.exists() and parked.exists()
  assert "may still be running" in caplog.text and "rename it back" in caplog.text


def test_staged_directory_replaces_only_when_complete(tmp_path):
  target = tmp_path / "out"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with output_dirs.staged_directory(target) as staging:
      (staging / "new.txt").write_text("new")
      raise RuntimeError("failed half-way")
  assert (target / "old.txt").read_text() == "old"
  with output_dirs.staged_directory(target) as staging:
    (staging / "new.txt").write_text("new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_symlink_to_the_source_is_the_source(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  (tmp_path / "link").symlink_to(source)
  with pytest.raises(UserError, match="is the source itself"):
    output_dirs.check_output_target(tmp_path / "link", sources=[source], overwrite=True,
                                    force=True, kind="model directory",
                                    is_kind=output_dirs.is_model_directory)


def test_metrics_keep_one_row_per_step_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 3, 4, 5)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')   # torn line
  assert workdir_lib.trim_metrics(path, last_step=4) == 4
  kept = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in kept] == [1, 2, 3, 4]
  assert workdir_lib.trim_metrics(path, last_step=4) == 0            # nothing more to drop


def test_resume_config_check(tmp_path):
  model = json.dumps({"llm": {"num_layers": 2}, "name": "tiny"})
  train = json.dumps({"total_steps": 10, "log_every": 5, "data": {"seq_len": 256}})
  # no checkpoint yet: anything goes
  assert workdir_lib.check_and_record_configs(tmp_path, model, train) == []
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  changed = json.dumps({"total_steps": 20, "log_every": 5, "data": {"seq_len": 256}})
  assert workdir_lib.check_and_record_configs(tmp_path, model, changed) == ["total_steps: 10 -> 20"]
  saved = (tmp_path / "model_config.json").read_text(), (tmp_path / "train_config.json").read_text()
  with pytest.raises(UserError, match="another model .*llm.num_layers: 2 -> 3"):
    workdir_lib.check_and_record_configs(tmp_path, model.replace("2", "3"), changed)
  with pytest.raises(UserError, match="data.seq_len: 256 -> 128"):
    workdir_lib.check_and_record_configs(tmp_path, model, changed.replace("256", "128"))
  assert ((tmp_path / "model_config.json").read_text(),
          (tmp_path / "train_config.json").read_text()) == saved


def test_lock_is_exclusive_and_released(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()}")
    child = subprocess.run(
        [sys.executable, "-c", "from molmo_jax.training.workdir import WorkdirLock\n"
         f"WorkdirLock({str(tmp_path)!r}).__enter__()"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.returncode != 0 and "another training run holds it" in child.stderr
  with workdir_lib.WorkdirLock(tmp_path):      # released: can be taken again
    pass
