"""`python -m molmo_jax.predict` on bad input: one line, exit 2 (4 for broken checkpoints), and
the checks run before the model is loaded or anything is generated."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, run_in_process, tree_hash
from PIL import Image

from molmo_jax import predict
from molmo_jax.predictor import fit_context


def _png(path, size=(40, 30)):
  Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
  return path


@pytest.fixture
def images(tmp_path):
  good = _png(tmp_path / "good.png")
  data = good.read_bytes()
  (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
  (tmp_path / "notes.png").write_text("this is a text file with an image's name\n")
  _png(tmp_path / "big.png", size=(200, 200))
  return tmp_path


@pytest.mark.parametrize("name,why", [("truncated.png", "cannot decode"),
                                      ("corrupt.jpg", "cannot decode"),
                                      ("notes.png", "cannot decode")])
def test_unreadable_images_are_named_before_the_model_loads(name, why, images, capfd):
  before = tree_hash(images)
  # A checkpoint that does not exist proves the image was checked first.
  code, err = run_in_process(predict.main, ["--checkpoint", str(images / "no_model"),
                                            "--image", str(images / name), "--prompt", "hi"], capfd)
  assert_one_line_error(code, err, 2, str(images / name), why)
  assert tree_hash(images) == before


def test_decompression_bomb_is_refused_with_the_flag_that_raises_the_limit(images, capfd,
                                                                          monkeypatch):
  # --max-image-pixels sets Pillow's process-wide cap: restore it for the tests that follow.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
  code, err = run_in_process(predict.main, ["--checkpoint", str(images / "no_model"),
                                            "--image", str(images / "big.png"), "--prompt", "hi",
                                            "--max-image-pixels", "1000"], capfd)
  assert_one_line_error(code, err, 2, str(images / "big.png"), "--max-image-pixels")


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--max-new-tokens", "0"),
                                        ("--max-crops", "0"), ("--top-p", "0"),
                                        ("--temperature", "-1"), ("--max-image-pixels", "-5")])
def test_numeric_flags_out_of_range(flag, value, tiny_model, capfd):
  code, err = run_in_process(predict.main, ["--checkpoint", str(tiny_model), "--prompt", "hi",
                                            flag, value], capfd)
  assert_one_line_error(code, err, 2, flag)


def test_draw_into_a_missing_folder_is_refused_before_any_work(images, capfd):
  target = images / "missing" / "out.png"
  code, err = run_in_process(predict.main, ["--checkpoint", str(images / "no_model"),
                                            "--image", str(images / "good.png"), "--prompt", "hi",
                                            "--draw", str(target)], capfd)
  assert_one_line_error(code, err, 2, "--draw", str(target), "does not exist")
  assert not target.parent.exists()


def test_missing_checkpoint(tmp_path, capfd):
  code, err = run_in_process(predict.main, ["--checkpoint", str(tmp_path / "nope"),
                                            "--prompt", "hi"], capfd)
  assert_one_line_error(code, err, 2, str(tmp_path / "nope"))


def test_truncated_checkpoint_is_a_storage_error_with_the_cause_first(tiny_model, tmp_path, capfd):
  model = tmp_path / "model"
  shutil.copytree(tiny_model, model)
  biggest = max((model / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:1000])
  before = tree_hash(model)
  code, err = run_in_process(predict.main, ["--checkpoint", str(model), "--prompt", "hi",
                                            "--max-new-tokens", "2"], capfd)
  line = assert_one_line_error(code, err, 4, str(model), "checkpoint data unreadable")
  assert "Event loop is closed" not in line
  assert tree_hash(model) == before


def test_prompt_beyond_the_context_is_refused_before_compiling(tiny_model, capfd):
  prompt = "word " * 700                          # the tiny model has 512 positions
  code, err = run_in_process(predict.main, ["--checkpoint", str(tiny_model), "--prompt", prompt,
                                            "--max-new-tokens", "8"], capfd)
  assert_one_line_error(code, err, 2, "prompt 0", "exceeds the model's 512 positions")


def test_context_check_counts_new_tokens_and_shortens_only_when_asked():
  assert fit_context([500], 12, 512) == 12
  with pytest.raises(ValueError, match="500 tokens.*\\+ max_new_tokens 13 = 513 exceeds"):
    fit_context([500, 20], 13, 512, labels=["a.png", "b.png"])
  assert fit_context([500, 20], 13, 512, shorten=True) == 12
  with pytest.raises(ValueError, match="exceeds"):
    fit_context([512], 1, 512, shorten=True)   # the prompt alone fills the context


def test_debug_shows_the_traceback(images, capfd):
  code, err = run_in_process(predict.main, ["--debug", "--checkpoint", str(images / "no_model"),
                                            "--image", str(images / "notes.png"),
                                            "--prompt", "hi"], capfd)
  assert code == 2 and err.startswith("error: ") and "Traceback" in err


def test_in_memory_bytes_name_is_kept():
  from molmo_jax.preprocess import image_io
  with pytest.raises(image_io.ImageLoadError, match="upload.png"):
    image_io.load_image(io.BytesIO(b"garbage").getvalue(), name="upload.png")
