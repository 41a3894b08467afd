"""Tokenizer id rule, image token blocks, image_input_idx and prompt strings (the reference's olmo/data/model_preprocessor.py (token layout); olmo/data/data_formatter.py (chat format))."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from molmo_jax.preprocess import tokens as T
from molmo_jax.preprocess.types import IGNORED_INDEX, MultiCropImage

WORDS = ["[UNK]", "User:", "Assistant:", "What", "is", "this?", "a", "cat", "dog", "hi", "vqa2:"]
EOS = "<|endoftext|>"
VOCAB = 32


def word_tokenizer(extra_special=()):
  """A whitespace word-level tokenizer: ids 0..10 are WORDS, 11 is EOS, then `extra_special`."""
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([EOS, *extra_special])
  return tok


def released_style_tokenizer():
  """Padded with placeholders up to VOCAB, then the five image tokens, as released files are."""
  placeholders = [f"|<EXTRA_TOKENS_{i}>|" for i in range(VOCAB - len(WORDS) - 1)]
  return word_tokenizer(placeholders + list(T.IMAGE_SPECIAL_TOKENS))


def test_image_token_ids_added_by_us_follow_vocab_size():
  tok = T.MolmoTokenizer(word_tokenizer(), VOCAB)
  assert tok.image_special_ids == (32, 33, 34, 35, 36)
  assert (tok.image_start_id, tok.image_end_id, tok.image_patch_id, tok.image_col_id,
          tok.image_prompt_id) == (32, 33, 34, 35, 36)
  assert tok.eos_id == tok.bos_id == 11
  assert tok.vocab_size == VOCAB
  assert tok.encode("<im_start>hi<|image|> cat<im_col>") == [32, 9, 36, 7, 35]
  assert tok.encode(f"a cat{EOS}") == [6, 7, 11]


def test_image_token_ids_already_in_the_file_are_used_and_decoded_away():
  raw = released_style_tokenizer()
  assert raw.token_to_id("<im_patch>") == 34
  tok = T.MolmoTokenizer(raw, VOCAB)
  assert tok.image_special_ids == (32, 33, 34, 35, 36)
  assert tok.encode("hi <im_patch> <|image|>") == [9, 34, 36]
  placeholder = raw.token_to_id("|<EXTRA_TOKENS_3>|")
  assert placeholder == 15
  assert tok.decode([9, placeholder, 34, 7, -1, 36, 11]) == f"hi cat {EOS}"


def test_decode_drops_ids_the_file_does_not_have():
  tok = T.MolmoTokenizer(word_tokenizer(), VOCAB)
  assert tok.decode([3, 4, 20, 31, 32, 5]) == "What is this?"


@pytest.mark.parametrize("extra, message", [
    (list(T.IMAGE_SPECIAL_TOKENS), "<im_start>' at id 12"),             # no padding
    ([f"|<EXTRA_TOKENS_{i}>|" for i in range(20)] + ["<im_end>", "<im_start>"], "id 32 is '<im_end>'"),
])
def test_image_tokens_at_wrong_ids_are_an_error(extra, message):
  with pytest.raises(ValueError, match=message):
    T.MolmoTokenizer(word_tokenizer(extra), VOCAB)


def test_tokenizer_larger_than_vocab_size_is_an_error():
  with pytest.raises(ValueError, match="tokenizer has 12 entries but vocab_size is 10"):
    T.MolmoTokenizer(word_tokenizer(), 10)


def test_missing_eos_is_an_error():
  with pytest.raises(ValueError, match="eos token '<eos>' is not in the tokenizer"):
    T.MolmoTokenizer(word_tokenizer(), VOCAB, eos_token="<eos>")


def test_from_checkpoint_reads_tokenizer_json_and_eos_from_config(tmp_path):
  word_tokenizer(["|||IP_ADDRESS|||"]).save(str(tmp_path / "tokenizer.json"))
  assert T.MolmoTokenizer.from_checkpoint(tmp_path, VOCAB).eos_id == 11
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": {"content": "|||IP_ADDRESS|||"}}))
  tok = T.MolmoTokenizer.from_checkpoint(tmp_path, VOCAB)
  assert tok.eos_id == tok.bos_id == 12
  assert tok.encode("hi <im_end>") == [9, 33]
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    T.MolmoTokenizer.from_checkpoint(tmp_path / "missing", VOCAB)


def hand_image(lowres=(2, 2), pooled=(2, 3), feature_rank=None):
  """A 1x2-crop image with a 2x3 pooled grid: crop 0 keeps pooled columns 0-1, crop 1 column 2."""
  if feature_rank is None:
    d = IGNORED_INDEX
    feature_rank = [[0, 1, 2, 3], [4, 5, 7, 8], [d, 6, d, 9]]
  rank = np.array(feature_rank, np.int32)
  n = rank.shape[0]
  return MultiCropImage(images=np.zeros((n, 16, 48), np.float32),
                        image_masks=np.ones((n, 16), np.float32), feature_rank=rank,
                        crop_grid=(1, n - 1), pooled_grid=pooled, lowres_grid=lowres,
                        original_size=(40, 20))


def test_image_token_block_layout():
  tok = T.MolmoTokenizer(word_tokenizer(), VOCAB)
  s, e, p, c = 32, 33, 34, 35
  tokens, positions = T.image_token_block(hand_image(), tok)
  assert tokens.tolist() == ([s, p, p, c, p, p, c, e] + [s, p, p, p, c, p, p, p, c, e])
  assert len(tokens) == 2 + 2 * (2 + 1) + 2 + 2 * (3 + 1)
  assert positions.tolist() == [1, 2, 4, 5, 9, 10, 11, 13, 14, 15]
  assert tokens.dtype == np.int32 and positions.dtype == np.int32

  tokens, positions = T.image_token_block(hand_image(), tok, use_col_tokens=False)
  assert tokens.tolist() == [s, p, p, p, p, e, s] + [p] * 6 + [e]
  assert positions.tolist() == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]


def test_image_input_idx_offsets_only_kept_cells():
  tok = T.MolmoTokenizer(word_tokenizer(), VOCAB)
  image = hand_image()
  tokens, positions = T.image_token_block(image, tok)
  idx = T.image_input_idx(image, positions, offset=200)
  assert idx.dtype == np.int32 and idx.shape == (3, 4)
  d = IGNORED_INDEX
  assert idx.tolist() == [[201, 202, 204, 205], [209, 210, 213, 214], [d, 211, d, 215]]
  kept = idx[idx >= 0] - 200
  assert sorted(kept.tolist()) == np.flatnonzero(tokens == tok.image_patch_id).tolist()


def test_image_input_idx_rejects_ranks_that_do_not_cover_the_block():
  tok = T.MolmoTokenizer(word_tokenizer(), VOCAB)
  image = hand_image(feature_rank=[[0, 1, 2, 3], [4, 5, 7, 8], [IGNORED_INDEX, 6, 8, 9]])
  _, positions = T.image_token_block(image, tok)
  with pytest.raises(ValueError, match="exactly once"):
    T.image_input_idx(image, positions, 0)


def test_chat_strings_match_the_spec_examples():
  assert T.format_messages(["What is this?"]) == [" User: What is this? Assistant:"]
  assert T.format_messages(["q", "a"]) == [" User: q Assistant:", " a"]
  turns = T.format_messages(["q1", "a1", "q2", "a2"])
  text = "".join(m + ("<EOS>" if i % 2 else "") for i, m in enumerate(turns))
  assert text == " User: q1 Assistant: a1<EOS> User: q2 Assistant: a2<EOS>"
  assert T.format_messages(["q", "a"], always_start_with_space=False) == ["User: q Assistant:", " a"]
  assert T.format_messages(["long_caption 65:", "A cat."], message_format="none") == [
      " long_caption 65:", " A cat."]
  with pytest.raises(ValueError, match="message_format"):
    T.format_messages(["q"], message_format="chatml")


class FixedRng:
  """Stands in for a numpy rng with scripted draws."""

  def __init__(self, uniform, normal=0.0):
    self.uniform, self.normal_value = uniform, normal

  def random(self):
    return self.uniform

  def normal(self, scale=1.0):
    return self.normal_value


def test_style_prefixes():
  q = "What is the man holding?"
  assert T.format_messages([T.with_style(q, "vqa2")]) == [
      " User: vqa2: What is the man holding? Assistant:"]
  assert T.with_style(q, "eval_short_answer") == "vqa2: " + q
  assert T.with_style(q, "eval_multiple_choice") == "a_okvqa_mc: " + q
  assert T.with_style(q, None) == q
  for style in ("point_count", "pointing", "user_qa", "long_caption"):
    assert T.with_style(q, style) == q                       # inference: never
    assert T.with_style(q, style, FixedRng(0.5)) == q        # training: 90 % without
    assert T.with_style(q, style, FixedRng(0.05)) == f"{style}: {q}"
  for style in ("android_control", "demo"):
    assert T.with_style(q, style, FixedRng(0.05)) == q
  assert T.with_style("", "chart_qa") == "chart_qa:"


def test_caption_length_prompts():
  assert T.format_messages([T.caption_length_prompt()], "none") == [" long_caption 65:"]
  caption = "x" * 100
  # (100 + int(-7.9)) // 15 = 93 // 15 = 6
  assert T.caption_length_prompt("long_caption", caption, FixedRng(0.5, -7.9)) == "long_caption 6:"
  assert T.caption_length_prompt("transcript", caption, FixedRng(0.5, 7.9)) == "transcript 7:"
  assert T.format_messages([T.caption_length_prompt("long_caption", caption, FixedRng(0.05))],
                           "none") == [" long_caption :"]
  with pytest.raises(ValueError, match="needs an rng"):
    T.caption_length_prompt("long_caption", caption)


def test_multiple_choice_prompts():
  prompt, answer = T.format_multiple_choice("Which?", ["red", "blue", "green"], answer_index=1)
  assert prompt == "Which?\nA: red\nB: blue\nC: green\n" and answer == "B"
  prompt, answer = T.format_multiple_choice("Which?", ["A", "C"], answer_index=1, labelled=False)
  assert prompt == "Which?\nA\nC\n" and answer == "C"
  assert T.format_multiple_choice("Which?", ["x", "y"])[1] is None
  with pytest.raises(ValueError, match="at most 7 labels"):
    T.format_multiple_choice("Which?", [str(i) for i in range(8)])
  with pytest.raises(ValueError, match="answer_index 2"):
    T.format_multiple_choice("Which?", ["x", "y"], answer_index=2)
