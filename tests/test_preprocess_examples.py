"""Example building, packing, masks/positions and collation (the reference's olmo/data/model_preprocessor.py (where the image goes in the text); olmo/data/collator.py; olmo/train.py (loss))."""

import dataclasses
import math

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from molmo_jax.config import PreprocessConfig, tiny
from molmo_jax.preprocess import examples as E
from molmo_jax.preprocess.tokens import MolmoTokenizer, image_token_block
from molmo_jax.preprocess.types import IGNORED_INDEX, MultiCropImage

# Crops of 4x4 patches of 4x4 px -> P = 16, C = 48, Q = 4 pooled cells (2x2) per crop.
PRE = PreprocessConfig(crop_size=16, patch_size=4, pool_size=2, overlap_margins=(1, 1), max_crops=4)
PRE_BOS = dataclasses.replace(PRE, text_only_bos=True)
WORDS = ["[UNK]", "User:", "Assistant:", "What", "is", "this?", "a", "cat", "dog", "hi", "vqa2:"]
USER, HI, ASSISTANT, A, CAT, DOG, WHAT = 1, 9, 2, 6, 7, 8, 3
EOS = BOS = 11
START, END, PATCH, COL, PROMPT = 32, 33, 34, 35, 36
S = E.ATTEND_ALL_SUBSEGMENT


@pytest.fixture(scope="module")
def tok():
  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  raw.add_special_tokens(["<|endoftext|>"])
  return MolmoTokenizer(raw, vocab_size=32)


def one_crop_image(fill=1.0):
  """1x1 crop grid: global view + one crop, lowres 2x2 and pooled 2x2 -> 16-token block."""
  return MultiCropImage(images=np.full((2, 16, 48), fill, np.float32),
                        image_masks=np.full((2, 16), 0.5, np.float32),
                        feature_rank=np.arange(8, dtype=np.int32).reshape(2, 4),
                        crop_grid=(1, 1), pooled_grid=(2, 2), lowres_grid=(2, 2),
                        original_size=(16, 16))


def two_crop_image():
  """1x2 crop grid with a 2x3 pooled grid; crop 1 discards its left column."""
  d = IGNORED_INDEX
  return MultiCropImage(images=np.full((3, 16, 48), 2.0, np.float32),
                        image_masks=np.ones((3, 16), np.float32),
                        feature_rank=np.array([[0, 1, 2, 3], [4, 5, 7, 8], [d, 6, d, 9]], np.int32),
                        crop_grid=(1, 2), pooled_grid=(2, 3), lowres_grid=(2, 2),
                        original_size=(24, 16))


BLOCK_1 = [START, PATCH, PATCH, COL, PATCH, PATCH, COL, END] * 2


def assert_patches_covered_once(ex, tok):
  """Every kept image_input_idx entry is an <im_patch> token and each one is hit exactly once."""
  idx = ex["image_input_idx"][ex["image_input_idx"] >= 0]
  assert np.all(ex["input_ids"][idx] == tok.image_patch_id)
  assert sorted(idx.tolist()) == np.flatnonzero(ex["input_ids"] == tok.image_patch_id).tolist()


def test_training_example_layout(tok):
  ex = E.build_example(["hi", "a cat"], [one_crop_image()], tok, PRE, for_training=True)
  tokens = BLOCK_1 + [USER, HI, ASSISTANT, A, CAT, EOS]
  assert ex["target_ids"].tolist() == tokens
  assert ex["input_ids"].tolist() == [BOS] + tokens[:-1]
  assert ex["loss_weights"].tolist() == [0.0] * 19 + [1.0, 1.0, 1.0]
  assert ex["subsegment_ids"].tolist() == [0] * 22
  assert ex["position_ids"].tolist() == list(range(22))
  assert ex["image_input_idx"].tolist() == [[2, 3, 5, 6], [10, 11, 13, 14]]
  assert ex["images"].shape == (2, 16, 48) and ex["image_masks"].shape == (2, 16)
  assert int(ex[E.IMAGE_TOKENS_END]) == 17
  assert_patches_covered_once(ex, tok)
  for key in E.TEXT_KEYS:
    assert ex[key].shape == (22,), key
  assert ex["input_ids"].dtype == np.int32 and ex["loss_weights"].dtype == np.float32


def test_inference_example_layout(tok):
  ex = E.build_example(["What is this?"], [one_crop_image()], tok, PRE, for_training=False)
  assert ex["input_ids"].tolist() == [BOS] + BLOCK_1 + [USER, WHAT, 4, 5, ASSISTANT]
  assert "target_ids" not in ex and "loss_weights" not in ex
  assert ex["position_ids"].tolist() == list(range(22))
  assert_patches_covered_once(ex, tok)
  single = E.build_example(["What is this?"], one_crop_image(), tok, PRE, for_training=False)
  assert single["input_ids"].tolist() == ex["input_ids"].tolist()


def test_multi_turn_weights_every_answer_and_a_per_example_weight(tok):
  ex = E.build_example(["hi", "cat", "hi", "dog"], None, tok, PRE_BOS, for_training=True,
                       weight=1.5)
  # targets: User: hi Assistant: cat EOS User: hi Assistant: dog EOS
  tokens = [USER, HI, ASSISTANT, CAT, EOS, USER, HI, ASSISTANT, DOG, EOS]
  assert ex["target_ids"].tolist() == tokens
  assert ex["input_ids"].tolist() == [BOS] + tokens[:-1]
  assert ex["loss_weights"].tolist() == [0, 0, 0, 1.5, 1.5, 0, 0, 0, 1.5, 1.5]


def test_text_only_training_example_has_no_bos_by_default(tok):
  ex = E.build_example(["hi", "cat", "hi", "dog"], None, tok, PRE, for_training=True, weight=1.5)
  tokens = [USER, HI, ASSISTANT, CAT, EOS, USER, HI, ASSISTANT, DOG, EOS]
  assert ex["input_ids"].tolist() == tokens[:-1]
  assert ex["target_ids"].tolist() == tokens[1:]
  assert ex["loss_weights"].tolist() == [0, 0, 1.5, 1.5, 0, 0, 0, 1.5, 1.5]
  assert ex["position_ids"].tolist() == list(range(9))
  assert ex["subsegment_ids"].tolist() == [0] * 9
  packed = E.build_example([["hi", "cat"], ["hi", "dog"]], None, tok, PRE, for_training=True)
  assert packed["input_ids"].tolist() == tokens[:-1]
  assert packed["subsegment_ids"].tolist() == [1] * 5 + [2] * 4
  assert packed["position_ids"].tolist() == list(range(5)) + list(range(4))


def test_text_only_inference_example_has_no_bos_by_default(tok):
  ex = E.build_example(["hi"], None, tok, PRE, for_training=False)
  assert ex["input_ids"].tolist() == [USER, HI, ASSISTANT]
  assert ex["position_ids"].tolist() == [0, 1, 2] and ex["subsegment_ids"].tolist() == [0, 0, 0]
  with_bos = E.build_example(["hi"], None, tok, PRE_BOS, for_training=False)
  assert with_bos["input_ids"].tolist() == [BOS, USER, HI, ASSISTANT]
  # Examples with an image keep their BOS whatever the option says.
  image = E.build_example(["hi"], [one_crop_image()], tok, PRE, for_training=False)
  assert image["input_ids"][0] == BOS


def test_text_only_example_has_empty_image_arrays(tok):
  ex = E.build_example(["hi"], [], tok, PRE_BOS, for_training=False)
  assert ex["input_ids"].tolist() == [BOS, USER, HI, ASSISTANT]
  assert ex["images"].shape == (0, 16, 48)
  assert ex["image_masks"].shape == (0, 16)
  assert ex["image_input_idx"].shape == (0, 4)
  assert int(ex[E.IMAGE_TOKENS_END]) == 0


def test_images_replace_their_markers(tok):
  first, second = one_crop_image(), two_crop_image()
  ex = E.build_example(["<|image|> hi <|image|> What", "cat"], [first, second], tok, PRE,
                       for_training=True)
  block_2, _ = image_token_block(second, tok)
  tokens = [USER] + BLOCK_1 + [HI] + block_2.tolist() + [WHAT, ASSISTANT, CAT, EOS]
  assert ex["target_ids"].tolist() == tokens
  assert PROMPT not in ex["input_ids"]
  assert ex["images"].shape == (5, 16, 48)
  assert_patches_covered_once(ex, tok)
  # The second block starts after BOS, "User:", the first block and "hi".
  assert ex["image_input_idx"][2].tolist() == [19 + 1, 19 + 2, 19 + 4, 19 + 5]
  assert ex["image_input_idx"][4, 0] == IGNORED_INDEX
  assert int(ex[E.IMAGE_TOKENS_END]) == 1 + 1 + 16 + 1 + len(block_2)


def test_marker_count_must_match_the_images(tok):
  with pytest.raises(ValueError, match="1 <|image|> marker.*2 image"):
    E.build_example(["<|image|> hi"], [one_crop_image(), one_crop_image()], tok, PRE, False)


def test_turn_parity_is_checked(tok):
  with pytest.raises(ValueError, match="training needs it to end with an assistant answer"):
    E.build_example(["hi"], None, tok, PRE, for_training=True)
  with pytest.raises(ValueError, match="inference needs it to end with a user turn"):
    E.build_example(["hi", "cat"], None, tok, PRE, for_training=False)


def test_image_shapes_are_checked_against_the_config(tok):
  with pytest.raises(ValueError, match=r"images\[0\].images has shape \(2, 16, 48\), expected"):
    E.build_example(["hi"], [one_crop_image()], tok, tiny().preprocess, for_training=False)


def test_style_prefix_goes_before_the_question(tok):
  ex = E.build_example(["hi"], None, tok, PRE, for_training=False, style="eval_short_answer")
  assert ex["input_ids"].tolist() == [USER, 10, HI, ASSISTANT]


def test_packing_hand_worked(tok):
  ex = E.build_example([["hi", "cat"], ["hi", "dog"]], [one_crop_image()], tok, PRE,
                       for_training=True)
  conv_a = [USER, HI, ASSISTANT, CAT, EOS]
  conv_b = [USER, HI, ASSISTANT, DOG, EOS]
  assert ex["target_ids"].tolist() == BLOCK_1 + conv_a + conv_b
  assert ex["input_ids"].tolist() == [BOS] + BLOCK_1 + conv_a + conv_b[:-1]
  assert ex["subsegment_ids"].tolist() == [S] * 17 + [1] * 5 + [2] * 4
  assert ex["position_ids"].tolist() == list(range(22)) + list(range(17, 21))
  w = math.sqrt(0.5)
  expected = np.zeros(26, np.float32)
  expected[[19, 20, 24, 25]] = w
  np.testing.assert_allclose(ex["loss_weights"], expected, rtol=1e-6)
  assert_patches_covered_once(ex, tok)

  mask = E.attention_mask_from_segments(ex["subsegment_ids"], np.ones(26, bool))
  # The first token of conversation b sees BOS + the image (0..16) and itself, not conversation a.
  assert np.flatnonzero(mask[22]).tolist() == list(range(17)) + [22]
  assert np.flatnonzero(mask[21]).tolist() == list(range(22))
  assert np.flatnonzero(mask[5]).tolist() == list(range(6))


def test_packing_weights_and_positions_for_three_conversations(tok):
  convs = [["hi", "cat"], ["hi", "a dog"], ["What", "cat"]]
  ex = E.build_example(convs, [one_crop_image()], tok, PRE, for_training=True, weight=2.0)
  weights = ex["loss_weights"][ex["loss_weights"] > 0]
  assert len(weights) == 2 + 3 + 2
  np.testing.assert_allclose(weights, 2.0 / math.sqrt(3), rtol=1e-6)
  seg, pos = ex["subsegment_ids"], ex["position_ids"]
  for s in (1, 2, 3):
    assert pos[seg == s].tolist() == list(range(17, 17 + int((seg == s).sum())))
  plain = E.build_example(convs, [one_crop_image()], tok, PRE, for_training=True,
                          root_subsegment_weighting=False)
  np.testing.assert_allclose(plain["loss_weights"][plain["loss_weights"] > 0], 1.0)


def test_packing_shuffles_conversations_with_an_rng(tok):
  convs = [["hi", "cat"], ["hi", "dog"]]
  first_answers = set()
  for seed in range(12):
    ex = E.build_example(convs, [one_crop_image()], tok, PRE, True, rng=np.random.default_rng(seed))
    answers = [t for t in ex["target_ids"].tolist() if t in (CAT, DOG)]
    assert sorted(answers) == [CAT, DOG]
    first_answers.add(answers[0])
    assert ex["subsegment_ids"][17:].tolist() == [1] * 5 + [2] * 4
  assert first_answers == {CAT, DOG}
  unshuffled = E.build_example(convs, [one_crop_image()], tok, PRE, True)
  assert [t for t in unshuffled["target_ids"].tolist() if t in (CAT, DOG)] == [CAT, DOG]


def test_packing_is_training_only_and_needs_images_at_the_start(tok):
  with pytest.raises(ValueError, match="training only"):
    E.build_example([["hi"], ["hi"]], None, tok, PRE, for_training=False)
  with pytest.raises(ValueError, match="images at the start"):
    E.build_example([["<|image|> hi", "cat"], ["hi", "dog"]], [one_crop_image()], tok, PRE, True)


def test_position_ids_and_mask_reference_rules():
  seg = np.array([S, S, S, 1, 1, 2, 2, 2, 3])
  assert E.position_ids_from_segments(seg).tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 3]
  valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
  mask = E.attention_mask_from_segments(seg, valid)
  assert np.flatnonzero(mask[6]).tolist() == [0, 1, 2, 5, 6]
  assert not mask[8].any() and not mask[:, 8].any()
  batched = E.attention_mask_from_segments(np.stack([seg, np.zeros(9, int)]), np.stack([valid] * 2))
  assert batched.shape == (2, 9, 9)
  assert (batched[1] == np.tril(np.outer(valid, valid))).all()


def two_examples(tok):
  with_image = E.build_example(["hi", "cat"], [two_crop_image()], tok, PRE, for_training=True)
  text_only = E.build_example(["hi", "dog", "hi", "cat"], None, tok, PRE, for_training=True)
  return [with_image, text_only]


def test_collate_shapes_and_padding(tok):
  exs = two_examples(tok)
  batch = E.collate(exs, seq_len=32, max_crops=3)
  assert set(batch) == set(E.TEXT_KEYS) | set(E.IMAGE_KEYS)
  for key in E.TEXT_KEYS:
    assert batch[key].shape == (2, 32), key
  assert batch["images"].shape == (2, 4, 16, 48) and batch["images"].dtype == np.float32
  assert batch["image_masks"].shape == (2, 4, 16)
  assert batch["image_input_idx"].shape == (2, 4, 4) and batch["image_input_idx"].dtype == np.int32
  n0 = len(exs[0]["input_ids"])
  assert batch["input_ids"][0, :n0].tolist() == exs[0]["input_ids"].tolist()
  assert (batch["input_ids"][0, n0:] == -1).all() and (batch["target_ids"][0, n0:] == -1).all()
  assert (batch["position_ids"][1, 9:] == -1).all() and (batch["subsegment_ids"][1, 9:] == -1).all()
  assert (batch["loss_weights"][0, n0:] == 0).all()
  assert (batch["images"][0, 3] == -1).all() and (batch["images"][0, :3] == 2.0).all()
  assert (batch["images"][1] == -1).all() and (batch["image_masks"][1] == -1).all()
  assert (batch["image_input_idx"][1] == -1).all()
  assert batch["image_input_idx"][0, :3].tolist() == exs[0]["image_input_idx"].tolist()


def test_collate_overflow_policies(tok):
  exs = two_examples(tok)  # lengths 1 + 18 (block) + 5 - 1 = 23 and 10 - 1 (no BOS)
  with pytest.raises(ValueError, match="example 0: 23 tokens do not fit seq_len 20"):
    E.collate(exs, seq_len=20, max_crops=3)
  dropped = E.collate(exs, seq_len=20, max_crops=3, on_overflow="drop")
  assert dropped["input_ids"].shape == (1, 20)
  assert dropped["input_ids"][0, :9].tolist() == exs[1]["input_ids"].tolist()

  cut = E.collate(exs, seq_len=19, max_crops=3, on_overflow="truncate_text")
  assert cut["input_ids"][0].tolist() == exs[0]["input_ids"][:19].tolist()
  assert cut["input_ids"][0, -1] == END
  assert cut["loss_weights"][0].tolist() == exs[0]["loss_weights"][:19].tolist()
  assert cut["input_ids"][1, :9].tolist() == exs[1]["input_ids"].tolist()
  with pytest.raises(ValueError, match="image blocks end at token 19"):
    E.collate(exs, seq_len=18, max_crops=3, on_overflow="truncate_text")

  with pytest.raises(ValueError, match="example 0: 3 crops .* max_crops \\+ 1 = 2"):
    E.collate(exs, seq_len=32, max_crops=1, on_overflow="truncate_text")
  assert E.collate(exs, seq_len=32, max_crops=1, on_overflow="drop")["images"].shape == (1, 2, 16, 48)
  with pytest.raises(ValueError, match="on_overflow"):
    E.collate(exs, seq_len=32, max_crops=3, on_overflow="ignore")


def test_collate_rejects_mixed_training_and_inference(tok):
  train = E.build_example(["hi", "cat"], None, tok, PRE, for_training=True)
  infer = E.build_example(["hi"], None, tok, PRE, for_training=False)
  with pytest.raises(ValueError, match="example 1: keys differ"):
    E.collate([train, infer], seq_len=16, max_crops=2)
  batch = E.collate([infer, infer], seq_len=16, max_crops=2)
  assert "target_ids" not in batch and batch["input_ids"].shape == (2, 16)
