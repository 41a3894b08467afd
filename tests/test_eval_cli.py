"""eval.py and the runner with a real (tiny, random-weight) checkpoint on every task's fixture.

One checkpoint and one Predictor serve the whole module; every call uses the same batch size,
crops and max_new_tokens so generation compiles once per prompt-length bucket. A random model
answers garbage, so these tests check the plumbing (reading, prompting, sharded generation,
outputs, resume, errors); test_eval_tasks.py checks the scores with a fake predictor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from molmo_jax import config as C
from molmo_jax import sharding
from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
from molmo_jax.evals import runner, synthetic_tasks, tasks  # noqa: F401 (registers synthetic_*)
from molmo_jax.models.molmo import Molmo, example_batch_shapes
from molmo_jax.predictor import Predictor
from molmo_jax.model_dir import save_model_checkpoint
from test_eval_tasks import FIXTURES, chartqa_fixture, countbench_fixture, vqav2_fixture

FAST = dict(batch_size=4, max_crops=2, max_new_tokens=4, progress=False)
FAST_FLAGS = ["--batch-size", "4", "--max-crops", "2", "--max-new-tokens", "4", "--no-progress"]


def _load_cli():
  spec = importlib.util.spec_from_file_location("eval_cli", Path(__file__).parents[1] / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


eval_cli = _load_cli()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_model")
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(root / "tokenizer", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = jax.jit(lambda b: nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), b))["params"])(batch)
  return save_model_checkpoint(root / "ckpt", jax.device_get(params), cfg,
                               tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="module")
def predictor(checkpoint):
  return Predictor.from_checkpoint(checkpoint, mesh=sharding.make_mesh(data=-1))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_task_runs_with_a_tiny_checkpoint(name, predictor, tmp_path):
  fixture = FIXTURES[name](tmp_path)
  result = runner.evaluate(predictor, name, data=fixture.data, output_dir=tmp_path / "out", **FAST)
  assert (result["evaluated"], result["skipped"]) == (fixture.evaluated, fixture.skipped)
  task = tasks.get_task(name)
  assert 0.0 <= result["score"] <= 100.0
  rows = [json.loads(line) for line in
          (tmp_path / "out" / f"{name}.predictions.jsonl").read_text().splitlines()]
  assert len(rows) == fixture.evaluated
  per_example = set(fixture.expected) - {k for k in fixture.expected if k.startswith("correct_")}
  for row in rows:
    assert isinstance(row["prediction"], str) and row["finish_reason"] in ("eos", "length")
    assert set(row["scores"]) >= per_example - {"relaxed_correctness_human",
                                                "relaxed_correctness_aug", "mc_ai2d_opaque",
                                                "mc_ai2d_transparent"}
  assert task.metric in result["metrics"]
  # Batches of 4 are rounded up to the 8 simulated devices; the mesh spans all of them.
  assert runner.device_multiple(predictor) == len(jax.devices()) == 8


def test_cli_writes_outputs_prints_the_table_and_resumes(checkpoint, tmp_path, capsys):
  fixture = chartqa_fixture(tmp_path)
  out = tmp_path / "out"
  args = ["--checkpoint", str(checkpoint), "--task", "chartqa", "--data", str(fixture.data),
          "--output", str(out), "--paper-model", "molmo-7b-d", *FAST_FLAGS]
  assert eval_cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "paper (molmo-7b-d)" in printed and "84.1" in printed and "relaxed_correctness" in printed
  predictions = out / "chartqa.predictions.jsonl"
  first = predictions.read_text().splitlines()
  metrics = json.loads((out / "chartqa.metrics.json").read_text())
  assert len(first) == 4 and metrics["evaluated"] == 4 and metrics["paper_score"] == 84.1
  assert metrics["settings"]["max_crops"] == 2 and metrics["settings"]["max_new_tokens"] == 4

  # Interrupted after two rows, the last one half written: the rerun completes it exactly.
  predictions.write_text("\n".join(first[:2]) + "\n" + first[2][:25])
  assert eval_cli.main(args) == 0
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in first]
  assert [r["prediction"] for r in rows] == [json.loads(line)["prediction"] for line in first]
  resumed = json.loads((out / "chartqa.metrics.json").read_text())
  assert resumed["resumed"] == 2 and resumed["metrics"] == metrics["metrics"]


def test_cli_all_runs_the_task_folders_and_reports_a_partial_average(checkpoint, tmp_path, capsys):
  for write in (chartqa_fixture, vqav2_fixture, countbench_fixture):
    write(tmp_path)                      # each writes tmp_path/<task name>/...
  out = tmp_path / "out"
  args = ["--checkpoint", str(checkpoint), "--task", "all", "--data", str(tmp_path),
          "--output", str(out), "--paper-model", "molmo-72b", *FAST_FLAGS]
  assert eval_cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "11-benchmark average (partial: 3/11 tasks)" in printed
  assert printed.count("no data") == 8
  summary = json.loads((out / "summary.json").read_text())
  assert [r["task"] for r in summary["results"]] == ["chartqa", "vqav2", "countbenchqa"]
  assert summary["average"]["tasks"] == 3 and not summary["average"]["complete"]
  assert {p.name for p in out.glob("*.metrics.json")} == {
    "chartqa.metrics.json", "vqav2.metrics.json", "countbenchqa.metrics.json"}


def test_cli_usage_and_data_errors(checkpoint, tmp_path, capsys):
  assert eval_cli.main(["--checkpoint", str(checkpoint), "--task", "chart_qa"]) == 2
  assert "unknown task 'chart_qa'" in capsys.readouterr().err
  assert eval_cli.main(["--checkpoint", str(checkpoint), "--task", "all"]) == 2
  assert "--task all needs --data" in capsys.readouterr().err
  assert eval_cli.main(["--checkpoint", str(checkpoint), "--task", "docvqa", "--data",
                        str(tmp_path / "missing"), *FAST_FLAGS]) == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    eval_cli.main(["--checkpoint", str(checkpoint), "--task", "chartqa", "--limit", "0"])


def test_predictions_of_another_model_are_never_resumed(predictor, tmp_path):
  fixture = FIXTURES["chartqa"](tmp_path / "data")
  runner.evaluate(predictor, "chartqa", data=fixture.data, output_dir=tmp_path / "out", **FAST)
  retrained = Predictor(predictor.config, jax.tree.map(lambda x: x * 1.01, predictor.params),
                        predictor.tokenizer, mesh=predictor.mesh)
  with pytest.raises(runner.DataError, match="model"):
    runner.evaluate(retrained, "chartqa", data=fixture.data, output_dir=tmp_path / "out", **FAST)
