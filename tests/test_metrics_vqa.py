"""Tests for the short-answer / multiple-choice metrics (molmo_jax.evals.metrics_vqa)."""

import pytest

from molmo_jax.evals.metrics import (a_okvqa_score, ai2d_mc_scores, anls, clean_vqa_prediction,
                                     exact_match, mc_score, normalize_vqa_answer,
                                     real_world_qa_score, relaxed_correctness, select_mc_option,
                                     vqa_score)

# ----------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize("raw,normalised", [
  ("Two", "2"),
  ("ten", "10"),
  ("eleven", "eleven"),              # number words stop at ten
  ("none", "0"),
  ("The dog", "dog"),
  ("an apple", "apple"),
  ("a cat.", "cat"),
  ("yes!", "yes"),
  ("1,000", "1000"),                 # digit,digit: every mark deleted
  ("1,000, 2", "1000 2"),
  ("red, white", "red white"),       # mark next to a space: deleted
  ("red,white", "red white"),        # otherwise: replaced by a space
  ("left-hand side", "left hand side"),
  ("3.5", "3.5"),                    # a period before a digit stays
  ("3.14.", "3.14"),
  ("U.S.A.", "usa"),
  ("dont", "don't"),
  ("isnt it", "isn't it"),
  ("couldnt've", "couldn't've"),
  ("couldntve", "couldntve"),        # not in the official table
  ("somebody'd", "somebodyd"),       # the official table's backwards entry
  ("Im", "im"),                      # capitalised official keys never match
  ("it's", "it's"),                  # apostrophes are not punctuation
  ("$5", "$5"),
  ("New\nYork", "new york"),
  ("Tab\there", "tab here"),
  ("  Hello   World  ", "hello world"),
  ("(a)", ""),                       # brackets removed, then the article
  ("x" + "." * 40, "x" + "." * 8),   # official count=re.UNICODE quirk: 32 periods at most
])
def test_normalize_vqa_answer(raw, normalised):
  assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize("prediction,references,expected", [
  ("2", ["2"] * 3 + ["3"] * 7, 1.0),
  ("2", ["2"] * 10, 1.0),
  ("2", ["2"] * 2 + ["3"] * 8, 2 / 3),
  ("2", ["2"] + ["3"] * 9, 1 / 3),
  ("4", ["2"] * 10, 0.0),
  ("Two", ["2", "2", "two"], 1.0),
  ("The Dog.", ["dog", "a dog", "dogs"], 2 / 3),
  ("", ["", "", "x"], 2 / 3),
  ("", ["x"], 0.0),
])
def test_vqa_score(prediction, references, expected):
  assert vqa_score(prediction, references) == pytest.approx(expected)


def test_vqa_score_refuses_bare_string_and_empty_references():
  with pytest.raises(TypeError, match="bare string"):
    vqa_score("2", "2")
  with pytest.raises(ValueError, match="references is empty"):
    vqa_score("2", [])


@pytest.mark.parametrize("prediction,references,expected", [
  ("Dog", ["dog", "dog", "dog"], 1.0),
  (" dog ", ["dog ", "cat"], 1 / 3),
  ("dogs", ["dog"] * 10, 0.0),
  ("the dog", ["dog"] * 10, 0.0),     # no article removal for A-OKVQA
  ("2", ["two"] * 10, 0.0),           # nor number words
])
def test_a_okvqa_score(prediction, references, expected):
  assert a_okvqa_score(prediction, references) == pytest.approx(expected)

# ----------------------------------------------------------------------------- ANLS and EM


@pytest.mark.parametrize("prediction,references,expected", [
  ("hello", ["hello"], 1.0),
  ("Hello", ["hello"], 1.0),
  ("helo", ["hello"], 0.8),
  ("abc", ["abcd"], 0.75),
  ("ab", ["abcd"], 0.0),              # distance exactly 0.5 is not below the threshold
  ("abc", ["xyz"], 0.0),
  ("", ["abc"], 0.0),
  ("", [""], 1.0),
  ("abc", ["x", "abd"], 1 - 1 / 3),
  ("abc", "abc", 1.0),
  (" abc", ["abc"], 0.75),            # space sensitive
  ("12,000", ["12000"], 1 - 1 / 6),
  ("abcdefghij", ["abcdefghix"], 0.9),
])
def test_anls(prediction, references, expected):
  assert anls(prediction, references) == pytest.approx(expected)


def test_anls_threshold_parameter():
  assert anls("ab", ["abcd"], threshold=0.6) == pytest.approx(0.5)


@pytest.mark.parametrize("prediction,references,expected", [
  ("Paris", ["paris"], 1.0),
  ("paris", "Paris", 1.0),
  (" paris", ["paris"], 0.0),
  ("lyon", ["paris", "london"], 0.0),
  ("London", ["paris", "LONDON"], 1.0),
  ("", [""], 1.0),
  ("the dog", ["dog"], 0.0),
])
def test_exact_match(prediction, references, expected):
  assert exact_match(prediction, references) == expected

# ----------------------------------------------------------------------------- relaxed correctness


@pytest.mark.parametrize("prediction,target,expected", [
  ("10", "10", 1.0),
  ("10.4", "10", 1.0),
  ("10.5", "10", 1.0),                # exactly 5 %
  ("10.6", "10", 0.0),
  ("9.5", "10", 1.0),
  ("9.4", "10", 0.0),
  ("50%", "0.5", 1.0),                # '%' divides by 100
  ("0.5", "50%", 1.0),
  ("51%", "50%", 1.0),
  ("50", "50%", 0.0),
  ("0", "0", 1.0),                    # zero target: exact match only
  ("0.0", "0", 0.0),
  ("0.01", "0", 0.0),
  ("Yes", "yes", 1.0),
  ("1,000", "1000", 0.0),             # commas are not removed
  ("-5", "-5.2", 1.0),
  ("abc", "10", 0.0),
  ("10", "abc", 0.0),
  (" 10 ", "10", 1.0),                # float() ignores surrounding spaces
  ("1e1", "10", 1.0),
  ("nan", "10", 0.0),
  ("12", ["5", "12.5"], 1.0),         # max over references
])
def test_relaxed_correctness(prediction, target, expected):
  assert relaxed_correctness(prediction, target) == expected


def test_relaxed_correctness_tolerance_parameter():
  assert relaxed_correctness("11", "10", max_relative_change=0.1) == 1.0
  assert relaxed_correctness("10.4", "10", max_relative_change=0.01) == 0.0

# ----------------------------------------------------------------------------- multiple choice

ABC = ["A", "B", "C"]
ANIMALS = ["cat", "dog", "bird", "cow"]


@pytest.mark.parametrize("prediction,options,expected", [
  ("A", ABC, 0),
  ("b", ABC, 1),
  (" C ", ABC, 2),
  ("B.", ABC, 1),                     # nearest by edit distance
  ("(C)", ABC, 2),
  ("dog", ANIMALS, 1),
  ("do", ANIMALS, 1),                 # the only option containing it
  ("bir", ANIMALS, 2),
  ("o", ANIMALS, 1),                  # in dog and cow: edit distance tie -> first
  ("Dog", ["dog food", "hot dog"], 1),
  ("cat", ["Cat", "cats"], 0),        # exact wins over containment
  ("", ["x", "y"], 0),
  ("", ["only"], 0),
  ("cot", ANIMALS, 0),                # in none: distance 1 to cat and cow -> first
  ("dig", ANIMALS, 1),                # in none: distance 1 to dog only
])
def test_select_mc_option(prediction, options, expected):
  assert select_mc_option(prediction, options) == expected


@pytest.mark.parametrize("options,match", [
  (["A", "a"], "distinct"),
  ([], "non-empty"),
  ("ABC", "non-empty list"),
])
def test_select_mc_option_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    select_mc_option("A", options)


def test_mc_score():
  assert mc_score("B", ABC, 1) == 1.0
  assert mc_score("A", ABC, 1) == 0.0


@pytest.mark.parametrize("abc_label,transparent,keys", [
  (False, False, {"mc_ai2d_transparent", "mc_ai2d_opaque"}),
  (False, True, {"mc_ai2d_transparent", "mc_ai2d_opaque"}),
  (True, True, {"mc_ai2d_transparent"}),
  (True, False, {"mc_ai2d_opaque"}),
])
def test_ai2d_subsets(abc_label, transparent, keys):
  right = ai2d_mc_scores("B", ABC, 1, abc_label, transparent)
  wrong = ai2d_mc_scores("C", ABC, 1, abc_label, transparent)
  assert set(right) == keys and set(wrong) == keys
  assert all(v == 1.0 for v in right.values()) and all(v == 0.0 for v in wrong.values())


@pytest.mark.parametrize("prediction,target,question_type,expected", [
  ("A", "A", "multiple_choice", 1.0),
  ("B", "A", "multiple_choice", 0.0),
  ("b", "B", "multiple_choice", 1.0),
  ("D.", "D", "multiple_choice", 1.0),
  ("Two", "2", "short_answer", 1.0),
  ("two dogs", "2 dogs", "short_answer", 1.0),
  ("red.", "Red", "short_answer", 1.0),
  ("blue", "red", "short_answer", 0.0),
])
def test_real_world_qa_score(prediction, target, question_type, expected):
  assert real_world_qa_score(prediction, target, question_type) == expected


def test_real_world_qa_bad_inputs():
  with pytest.raises(ValueError, match="target must be one of"):
    real_world_qa_score("A", "E", "multiple_choice")
  with pytest.raises(ValueError, match="question_type"):
    real_world_qa_score("A", "A", "mc")

# ----------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize("raw,cleaned", [
  ("yes", "yes"),
  ("  x   y  ", "x y"),
  ("Answer: yes", "yes"),
  ("Reasoning... Answer:  no ", "no"),
  ("Answer: no Answer: maybe", "no"),     # text between the first two "Answer:"
  ("Answer:", ""),
  ("a\nb\na", "a"),
  ("a\nb", "a"),                          # tie: first line
  ("line  one\nline one\nother", "line one"),
  ("\n\nfoo\n", "foo"),                   # stripped first: a single line
  ("", ""),
])
def test_clean_vqa_prediction(raw, cleaned):
  assert clean_vqa_prediction(raw) == cleaned
