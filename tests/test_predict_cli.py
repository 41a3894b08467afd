"""`python -m molmo_jax.predict` end to end on a tiny checkpoint made here: text, JSON, PNG."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from molmo_jax import config as C
from molmo_jax import predict
from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
from molmo_jax.models.molmo import Molmo, example_batch_shapes
from molmo_jax.predictor import Predictor, apply_stop_strings
from molmo_jax.model_dir import save_model_checkpoint


def _checkpoint(root):
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(root / "tokenizer", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  # Make the random model say a point: bias the LM head towards the tokens of one answer.
  return save_model_checkpoint(root / "ckpt", jax.device_get(params), cfg, tokenizer_dir=root / "tokenizer")


def test_predict_command_prints_json_and_draws_points(tmp_path, capsys, monkeypatch):
  ckpt = _checkpoint(tmp_path)
  image = tmp_path / "cat.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
  answer = '<point x="20.0" y="40.0" alt="cat">cat</point>'
  # The random-weight model generates noise; the command's own logic (batching, parsing,
  # drawing) is what is under test, so its generation is replaced by a fixed answer once.
  real_predict = Predictor.predict

  def fixed_answer(self, images, prompts, **kwargs):
    preds = real_predict(self, images, prompts, **kwargs)
    for p in preds:
      p.text = answer
      from molmo_jax.preprocess import points as points_lib
      p.points = points_lib.parse_points(answer, p.image_size)
    return preds

  monkeypatch.setattr(Predictor, "predict", fixed_answer)
  out_png = tmp_path / "drawn.png"
  code = predict.main(["--checkpoint", str(ckpt), "--image", str(image), "--prompt", "Point to the cat",
                       "--max-new-tokens", "4", "--json", "--draw", str(out_png)])
  assert code == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["answer"] == answer and row["image_size"] == [70, 50]
  np.testing.assert_allclose(row["points"], [[14.0, 20.0]])
  drawn = np.asarray(Image.open(out_png).convert("RGB"))
  original = np.asarray(Image.open(image).convert("RGB"))
  assert drawn.shape == original.shape
  assert (drawn[20, 14] != original[20, 14]).any()


def test_predict_command_batches_pairs_and_reports_finish_reasons(tmp_path, capsys):
  ckpt = _checkpoint(tmp_path)
  paths = []
  for i, size in enumerate([(40, 30), (90, 60)]):
    p = tmp_path / f"im{i}.png"
    Image.fromarray(np.full(size[::-1] + (3,), 40 * i, np.uint8)).save(p)
    paths.append(str(p))
  code = predict.main(["--checkpoint", str(ckpt), "--image", paths[0], "--prompt", "What is this?",
                       "--image", paths[1], "--prompt", "Describe", "--max-new-tokens", "3", "--json"])
  assert code == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["image_size"] for r in rows] == [[40, 30], [90, 60]]
  assert all(r["finish_reason"] in ("eos", "length") for r in rows)


def test_stop_strings_cut_the_answer():
  assert apply_stop_strings("a total of 3. Extra", ["."]) == ("a total of 3", True)
  assert apply_stop_strings("no stop here", ["###"]) == ("no stop here", False)
