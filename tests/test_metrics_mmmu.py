"""Tests for the MMMU answer parsing and scoring (molmo_jax.evals.metrics_mmmu)."""

import random

import pytest

from molmo_jax.evals.metrics import (MMMU_RANDOM_SEED, eval_multi_choice, eval_open, mmmu_score,
                                     parse_multi_choice_response, parse_open_response)

LETTERS = ["A", "B", "C", "D"]
TEXTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("response,expected", [
  ("(A)", "A"),
  ("The answer is (B).", "B"),
  ("(A) or (C)", "C"),                            # last mention wins
  ("(C) or (A)", "A"),
  ("B", "B"),
  ("B.", "B"),
  (":B'", "B"),                                   # edge punctuation stripped
  ("I think C is right", "C"),
  ("A and B", "B"),
  ("(B) not A", "B"),                             # bracketed letters take priority
  ("Option D", "D"),
  ("It is definitely a bird in the picture", "C"),  # > 5 words: option texts
  ("the dog chased the cat today", "A"),
  ("a fish and a dog were in there", "B"),
])
def test_parse_multi_choice_response(response, expected):
  assert parse_multi_choice_response(response, LETTERS, TEXTS) == expected


@pytest.mark.parametrize("response", ["(E)", "A)", "cat dog", "a", ""])
def test_multi_choice_random_fallback_is_seeded(response):
  # Short answers naming no letter: a draw from a fresh Random(42) by default.
  expected = random.Random(MMMU_RANDOM_SEED).choice(LETTERS)
  assert parse_multi_choice_response(response, LETTERS, TEXTS) == expected


def test_multi_choice_shared_generator_reproduces_the_official_sequence():
  shared = random.Random(MMMU_RANDOM_SEED)
  draws = [parse_multi_choice_response("?", LETTERS, TEXTS, rng=shared) for _ in range(6)]
  replay = random.Random(MMMU_RANDOM_SEED)
  assert draws == [replay.choice(LETTERS) for _ in range(6)]


def test_multi_choice_needs_choices():
  with pytest.raises(ValueError, match="all_choices is empty"):
    parse_multi_choice_response("A", [], {})


@pytest.mark.parametrize("response,expected", [
  ("The answer is 42.", [42.0]),
  ("Paris", ["paris"]),
  ("x = 3.14159", [3.14]),
  ("1,234 apples", ["1,234 apples", 1234.0, 234.0]),    # official number regexes overlap
  ("The speed is 3e5 m/s", ["3e5 m/s", 300000.0, 5.0]),
  ("Step 1: x is 4\nSo the result is 8", [4.0, 8.0]),   # one key per line
  ("The cat is black. The dog is 7", [7.0]),            # sentence split never fires
  ("it is 5 so \nnothing here", ["5 so", 5.0]),        # empty tail replaced by a longer one
  ("", [""]),
])
def test_parse_open_response(response, expected):
  assert parse_open_response(response) == expected


@pytest.mark.parametrize("gold,response,expected", [
  ("42", "The answer is 42.", True),
  ("42.0", "The answer is 42.", True),
  ("43", "The answer is 42.", False),
  ("3.14", "x = 3.14159", True),
  ("3.1416", "x = 3.14159", True),                 # gold rounded to 2 decimals too
  ("1234", "1,234 apples", True),
  ("300000", "The speed is 3e5 m/s", True),
  ("Paris", "paris", True),
  ("London", "paris", False),
  ("black", "It is black and white", True),        # gold string inside the key tail
  ("a", "banana", False),                          # single letters need a space next to them
  ("a", "a b", True),
  (["12", "13"], "13", True),
  ("4", "Step 1: x is 4\nSo the result is 8", True),
])
def test_eval_open(gold, response, expected):
  assert eval_open(gold, parse_open_response(response)) is expected


def test_eval_multi_choice():
  assert eval_multi_choice("A", "A")
  assert eval_multi_choice(["A", "B"], "B")
  assert not eval_multi_choice("A", "B")


def test_mmmu_score():
  assert mmmu_score("(B)", "B", "multiple-choice", options=["cat", "dog", ""]) == 1.0
  assert mmmu_score("(C)", "B", "multiple-choice", options=["cat", "dog", "bird"]) == 0.0
  assert mmmu_score("The dog is the one on the left", "B", "multiple-choice",
                    options=["cat", "dog"]) == 1.0
  assert mmmu_score("The answer is 42.", "42", "open") == 1.0
  assert mmmu_score("The answer is 41.", ["42"], "open") == 0.0


def test_mmmu_score_bad_inputs():
  with pytest.raises(ValueError, match="question_type"):
    mmmu_score("A", "A", "multi_choice", options=["x"])
  with pytest.raises(ValueError, match="non-empty option"):
    mmmu_score("A", "A", "multiple-choice", options=["", ""])
