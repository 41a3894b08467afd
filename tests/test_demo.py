"""A shortened built-in demo runs end to end: model directory, metrics.json computed by the eval.py
runner, a contact sheet and a learning curve from checkpoints kept during training."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from molmo_jax import demo, plots


def _png(path):
  with Image.open(path) as image:
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.fixture
def restore_logging():
  """demo.main configures the root logger (basicConfig(force=True)) with a handler on this test's
  captured stderr; later tests in the process must not log into that closed stream."""
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  yield
  for handler in root.handlers[:]:
    if handler not in handlers:
      root.removeHandler(handler)
  for handler in handlers:
    if handler not in root.handlers:
      root.addHandler(handler)
  root.setLevel(level)


def test_short_demo_writes_model_metrics_contact_sheet_and_curve(tmp_path, capsys, restore_logging):
  workdir = tmp_path / "demo"
  code = demo.main(["--workdir", str(workdir), "--steps", "24", "--batch", "8", "--eval-examples", "8",
                    "--eval-batch", "8", "--curve-evals", "2", "--curve-examples", "4", "--sheet", "4"])
  assert code == 0
  assert (workdir / "model" / "config.json").is_file()
  assert (workdir / "model" / "params").is_dir()
  assert (workdir / "model" / "tokenizer" / "tokenizer.json").is_file()
  report = json.loads((workdir / "metrics.json").read_text())
  assert report["steps"] == 24
  for key in ("model", "chance", "no_image_features"):
    assert 0.0 <= report[key]["count_accuracy"] <= 1.0
    assert 0.0 <= report[key]["pointing_f1"] <= 1.0
    assert 0.0 <= report[key]["pointing_f1_with_objects"] <= 1.0

  # The headline numbers are the eval.py runner's, read back from the files it wrote.
  for task, key, metric in (("synthetic_count", "count_accuracy", "correct"),
                            ("synthetic_points", "pointing_f1", "f1")):
    written = json.loads((workdir / "eval-model" / f"{task}.metrics.json").read_text())
    assert report["model"][key] == written[metric]
    rows = (workdir / "eval-model" / f"{task}.predictions.jsonl").read_text().splitlines()
    assert len(rows) == 8

  # Learning curve: one evaluation per kept checkpoint (12 and 24), on 4 scenes per task.
  assert [p["step"] for p in report["curve"]] == [12, 24]
  for point in report["curve"]:
    assert 0.0 <= point["count_accuracy"] <= 1.0 and 0.0 <= point["pointing_f1"] <= 1.0
  final = json.loads((workdir / "curve" / "step-24" / "synthetic_count.metrics.json").read_text())
  assert final["evaluated"] == 4 and report["curve"][-1]["count_accuracy"] == final["correct"]
  assert report["train_loss"]["steps"][-1] == 24
  assert all(np.isfinite(report["train_loss"]["loss"]))
  curve = _png(workdir / "learning_curve.png")
  sheet = _png(workdir / "contact_sheet.png")
  assert curve.shape[1] > 600 and sheet.shape[0] > 200
  assert len(np.unique(sheet.reshape(-1, 3), axis=0)) > 20       # images and text, not a blank page

  # Readable in a log: no carriage-return progress bars when stdout/stderr are not terminals.
  out = capsys.readouterr()
  assert "\r" not in out.out and "\r" not in out.err
  assert "contact sheet:" in out.out and "learning curve:" in out.out


def test_contact_sheet_and_learning_curve_draw_what_they_are_given(tmp_path):
  image = np.full((40, 60, 3), 200, np.uint8)
  tiles = [plots.Tile(image, "Point to the red circle.", '<point x="50.0" y="50.0" alt="a">a</point>',
                      np.array([[30.0, 20.0]]), np.array([[10.0, 10.0]]), "pointing F1 0.00", False)] * 3
  sheet = np.asarray(plots.contact_sheet(tiles, tmp_path / "sheet.png", columns=2, cell=120))
  assert sheet.shape[1] == 2 * (120 + 8) + 8
  # The tile's image is drawn with both marks: the predicted point's red fill appears.
  assert ((sheet[..., 0] > 180) & (sheet[..., 1] < 80)).any()
  panel = plots.Panel("p", {"a": ([0, 10, 20], [1.0, 0.5, 0.25])}, y_range=(0.0, 1.0))
  chart = np.asarray(plots.learning_curve([panel, panel], tmp_path / "curve.png"))
  assert chart.shape[1] == 2 * 420 + 16
  assert (tmp_path / "curve.png").stat().st_size > 0
