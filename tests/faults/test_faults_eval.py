"""eval.py on bad input: missing checkpoint, empty data file, --task all without task folders."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO, assert_one_line_error, run_in_process, tree_hash

_spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)

FAST = ["--batch-size", "2", "--max-crops", "1", "--max-new-tokens", "2", "--no-progress"]


def test_missing_checkpoint(tmp_path, capfd):
  code, err = run_in_process(eval_cli.main, ["--checkpoint", str(tmp_path / "nope"),
                                             "--task", "chartqa", "--data", str(tmp_path)], capfd)
  assert_one_line_error(code, err, 2, str(tmp_path / "nope"))


def test_empty_data_file_is_an_error_naming_it(tiny_model, tmp_path, capfd):
  split = tmp_path / "chartqa" / "ChartQA Dataset" / "test"
  split.mkdir(parents=True)
  for name in ("test_human.json", "test_augmented.json"):
    (split / name).write_text(json.dumps([]))
  before = tree_hash(tmp_path / "chartqa")
  code, err = run_in_process(eval_cli.main, ["--checkpoint", str(tiny_model), "--task", "chartqa",
                                             "--data", str(tmp_path / "chartqa"),
                                             "--output", str(tmp_path / "out"), *FAST], capfd)
  assert_one_line_error(code, err, 2, "chartqa")
  assert tree_hash(tmp_path / "chartqa") == before


def test_task_all_without_task_folders_names_what_it_found(tiny_model, tmp_path, capfd):
  data = tmp_path / "data"
  (data / "misc").mkdir(parents=True)
  code, err = run_in_process(eval_cli.main, ["--checkpoint", str(tiny_model), "--task", "all",
                                             "--data", str(data), "--output", str(tmp_path / "o"),
                                             *FAST], capfd)
  line = assert_one_line_error(code, err, 2, str(data), "none of the task folders", "misc")
  assert "chartqa" in line and not (tmp_path / "o" / "summary.json").exists()


def test_numeric_flags(tiny_model, tmp_path, capfd):
  code, err = run_in_process(eval_cli.main, ["--checkpoint", str(tiny_model), "--task", "chartqa",
                                             "--max-new-tokens", "0"], capfd)
  assert_one_line_error(code, err, 2, "--max-new-tokens")
