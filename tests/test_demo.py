"""A shortened built-in demo runs end to end: checkpoint, metrics JSON and a PNG with points."""

import json

from molmo_jax import demo


def test_short_demo_writes_model_metrics_and_pictures(tmp_path):
  workdir = tmp_path / "demo"
  code = demo.main(["--workdir", str(workdir), "--steps", "4", "--batch", "8", "--eval-examples", "8",
                    "--eval-batch", "8", "--pictures", "1"])
  assert code == 0
  assert (workdir / "model" / "config.json").is_file()
  assert (workdir / "model" / "params").is_dir()
  assert (workdir / "model" / "tokenizer" / "tokenizer.json").is_file()
  report = json.loads((workdir / "metrics.json").read_text())
  assert report["steps"] == 4
  for key in ("model", "chance", "no_image_features"):
    assert 0.0 <= report[key]["count_accuracy"] <= 1.0
    assert 0.0 <= report[key]["pointing_f1"] <= 1.0
    assert 0.0 <= report[key]["pointing_f1_with_objects"] <= 1.0
  assert (workdir / "points-0.png").stat().st_size > 0
  # The evaluation wrote its predictions incrementally.
  rows = (workdir / "eval-model" / "synthetic_count.predictions.jsonl").read_text().splitlines()
  assert len(rows) == 8
