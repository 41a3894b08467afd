"""The public raw-input -> model-batch function (molmo_jax.preprocess.inputs) and its users."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from molmo_jax import config as C
from molmo_jax.data import demo_tokenizer
from molmo_jax.data import pipeline as P
from molmo_jax.data.sources import SourceConfig
from molmo_jax.predictor import Predictor
from molmo_jax.preprocess import inputs
from molmo_jax.preprocess.examples import build_example, collate
from molmo_jax.preprocess.image import multicrop_image
from molmo_jax.preprocess.tokens import MolmoTokenizer

VOCAB = demo_tokenizer.DEMO_VOCAB_SIZE
MODEL = C.tiny("qwen2", vocab_size=VOCAB, embedding_size=VOCAB)   # 32 px crops, max_crops 4
BATCH_KEYS = ("input_ids", "subsegment_ids", "position_ids", "images", "image_masks",
              "image_input_idx")


@pytest.fixture(scope="module")
def tok():
  return MolmoTokenizer(demo_tokenizer.build_demo_tokenizer(), vocab_size=VOCAB)


def rgba_png(path, width=70, height=45, seed=0):
  """An RGBA image whose transparent pixels hide colours (so alpha handling shows)."""
  rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
  rgba[: height // 2, :, 3] = 0
  Image.fromarray(rgba, "RGBA").save(path)
  return rgba


def test_batch_equals_the_training_example_path_for_the_same_conversation(tmp_path, tok):
  rgba_png(tmp_path / "a.png")
  question, answer = "What is red?", "a red circle"
  (tmp_path / "data.jsonl").write_text(json.dumps(
      {"image": "a.png", "style": "vqa2", "messages": [question, answer]}) + "\n")
  cfg = P.DataConfig(sources=(SourceConfig("custom", "jsonl", str(tmp_path / "data.jsonl")),),
                     seq_len=256, global_batch_size=1, on_overflow="error")
  evaluation = next(P.make_eval_batches(cfg, MODEL, tok, for_training=False))
  training = next(P.make_eval_batches(cfg, MODEL, tok, for_training=True))

  batch = inputs.build_batch([str(tmp_path / "a.png")], [question], tok, MODEL, style="vqa2",
                             seq_len=256)
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(batch.arrays[key], evaluation[key], err_msg=key)
  # The training example of the conversation starts with exactly the prompt's tokens and images.
  n = batch.lengths[0]
  np.testing.assert_array_equal(training["input_ids"][0, :n], batch.arrays["input_ids"][0, :n])
  np.testing.assert_array_equal(training["target_ids"][0, :n - 1],
                                batch.arrays["input_ids"][0, 1:n])
  answer_ids = training["target_ids"][0][training["loss_weights"][0] > 0]
  assert answer_ids[-1] == tok.eos_id and tok.decode(answer_ids[:-1]).strip() == answer
  for key in ("images", "image_masks", "image_input_idx"):
    np.testing.assert_array_equal(training[key], batch.arrays[key], err_msg=key)
  assert batch.image_sizes == [(70, 45)]
  assert batch.arrays["input_ids"].shape == (1, 256)


def test_images_are_loaded_with_the_configs_alpha_option(tmp_path, tok):
  rgba = rgba_png(tmp_path / "a.png")
  dropped = inputs.build_batch([tmp_path / "a.png"], ["Describe."], tok, MODEL)
  by_hand = build_example(["Describe."], [multicrop_image(rgba[..., :3], MODEL.preprocess)], tok,
                          MODEL, for_training=False)
  np.testing.assert_array_equal(dropped.arrays["images"][0, :len(by_hand["images"])],
                                by_hand["images"])
  composite = MODEL.with_preprocess(alpha="composite", alpha_background=(255, 255, 255))
  over_white = inputs.build_batch([tmp_path / "a.png"], ["Describe."], tok, composite)
  assert not np.array_equal(over_white.arrays["images"], dropped.arrays["images"])
  pixels = inputs.load_pixels(tmp_path / "a.png", composite)
  assert (pixels[:22] == 255).all()   # fully transparent rows are the background colour


def test_batch_mixes_text_only_several_images_and_ready_crops(tok):
  rng = np.random.default_rng(0)
  first = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  second = rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)
  cut = multicrop_image(second, MODEL.preprocess, max_crops=2)
  batch = inputs.build_batch([None, [first, cut], first], ["Say hi.", "Compare.", "Point."], tok,
                             MODEL, max_crops=2, length_bucket=16)
  assert batch.image_sizes == [None, (60, 40), (60, 40)]
  assert batch.arrays["input_ids"].shape[1] % 16 == 0
  text_only = build_example(["Say hi."], None, tok, MODEL, for_training=False)
  assert batch.arrays["input_ids"][0, :batch.lengths[0]].tolist() == text_only["input_ids"].tolist()
  assert text_only["input_ids"][0] != tok.bos_id    # no BOS without an image (the reference)
  two = build_example(["Compare."], [multicrop_image(first, MODEL.preprocess, max_crops=2), cut],
                      tok, MODEL, for_training=False)
  # Both images' crops (more than max_crops + 1 = 3) get slots: M grows to fit them.
  assert two["images"].shape[0] > 3 and batch.arrays["images"].shape[1] == two["images"].shape[0]
  expected = collate([text_only, two, text_only], batch.arrays["input_ids"].shape[1],
                     max_crops=two["images"].shape[0] - 1)
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(batch.arrays[key][1], expected[key][1], err_msg=key)


def test_bad_arguments_are_refused(tok):
  with pytest.raises(ValueError, match="1 images but 2 prompts"):
    inputs.build_batch([None], ["a", "b"], tok, MODEL)
  with pytest.raises(TypeError, match="got a str"):
    inputs.build_batch([None], "a", tok, MODEL)
  with pytest.raises(ValueError, match="do not fit seq_len 4"):
    inputs.build_batch([None], ["Say hi to everyone here."], tok, MODEL, seq_len=4)
  with pytest.raises(ValueError, match="length_bucket must be positive"):
    inputs.bucket_length(10, 0)
  assert inputs.bucket_length(65, 64) == 128 and inputs.bucket_length(0, 64) == 64


def test_predictor_uses_the_public_function(tok, monkeypatch):
  predictor = Predictor(MODEL, params=None, tokenizer=tok, max_crops=2, length_bucket=32)
  image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  ours = predictor.batch([image, None], ["Point.", "Say hi."], style="pointing")
  theirs = inputs.build_batch([image, None], ["Point.", "Say hi."], tok, MODEL, style="pointing",
                              max_crops=2, length_bucket=32)
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(ours.arrays[key], theirs.arrays[key], err_msg=key)
  calls = []
  real = inputs.build_batch
  monkeypatch.setattr(inputs, "build_batch", lambda *a, **k: calls.append(a) or real(*a, **k))
  monkeypatch.setattr(Predictor, "_generate", lambda self, arrays, sampling, seed: _no_tokens(
      len(arrays["input_ids"])))
  pred, = predictor.predict([image], ["Point."])
  assert len(calls) == 1 and pred.logprobs is None and "logprobs" not in pred.to_json()
  monkeypatch.setattr(Predictor, "_generate", lambda self, arrays, sampling, seed: _no_tokens(
      len(arrays["input_ids"]), logprobs=True))
  pred, = predictor.predict([image], ["Point."])
  assert pred.logprobs == [-0.5] and pred.to_json()["logprobs"] == [-0.5]


def _no_tokens(batch, logprobs=False):
  """A generation result of one token (id 5) per row, without running a model."""
  from molmo_jax.generate import GenerationOutput
  return GenerationOutput(np.full((batch, 2), 5, np.int32), np.ones(batch, np.int32),
                          ["length"] * batch,
                          logprobs=np.full((batch, 2), -0.5, np.float32) if logprobs else None)


def test_resize_method_is_chosen_without_rebuilding_the_config():
  torch_cfg = MODEL.with_preprocess(resize_method="torchvision")
  assert torch_cfg.preprocess.resize_method == "torchvision"
  assert dataclasses.replace(torch_cfg, preprocess=MODEL.preprocess) == MODEL
  with pytest.raises(ValueError, match="preprocess.resize_method: expected one of"):
    MODEL.with_preprocess(resize_method="pil")
  with pytest.raises(ValueError, match="unknown field"):
    MODEL.with_preprocess(resize="torchvision")
