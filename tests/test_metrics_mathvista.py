"""Tests for MathVista extraction, normalisation and scoring (molmo_jax.evals.metrics_mathvista)."""

import pytest

from molmo_jax.evals.metrics import (math_vista_score, normalize_extracted_answer,
                                     rule_based_extract_answer, simplify_math_vista_question)

CHOICES = ["3/11", "8/11", "6/11", "3/5"]


def multi_choice(answer="8/11"):
  return dict(question_type="multi_choice", answer_type="text", choices=CHOICES, precision=None,
              answer=answer, query="What fraction of the shape is blue?")


def free_form(answer_type, answer, precision=None):
  return dict(question_type="free_form", answer_type=answer_type, choices=None,
              precision=precision, answer=answer, query="q")


@pytest.mark.parametrize("response,expected", [
  ("B", 1.0),
  ("(B)", 1.0),
  ("B.", 1.0),
  ("B: 8/11", 1.0),
  ("The answer is B.", 1.0),
  ("Answer: B", 1.0),
  ("8/11", 1.0),                                  # already a choice: no extraction
  ("the fraction is 8/11", 1.0),                  # option text mentioned
  ("8/12", 1.0),                                  # nearest option by edit distance
  ("C", 0.0),
  ("A bird", 0.0),                                # the article "A" is not option A
])
def test_multi_choice_scores(response, expected):
  assert math_vista_score(response, multi_choice()) == expected


@pytest.mark.parametrize("response,metadata,expected", [
  ("14", free_form("integer", "14"), 1.0),
  ("14.0", free_form("integer", "14"), 1.0),
  ("The number missing in the sequence is 14.", free_form("integer", "14"), 1.0),
  ("There are 3 cats and 2 dogs, so 5 animals.", free_form("integer", "5"), 1.0),
  ("The area is 144 cm^2", free_form("integer", "144"), 1.0),
  ("three", free_form("integer", "3"), 1.0),
  ("1,200", free_form("integer", "1200"), 1.0),
  ("15", free_form("integer", "14"), 0.0),
  ("", free_form("integer", "14"), 0.0),
  ("no idea", free_form("integer", "14"), 0.0),
  ("1.45", free_form("float", "1.45", 2), 1.0),
  ("Luca needs $1.45 to buy it.", free_form("float", "1.45", 2), 1.0),
  ("0.62", free_form("float", "0.6", 1), 1.0),     # rounded to the precision
  ("0.62", free_form("float", "0.6", 1.0), 1.0),   # float precision as stored in the dataset
  ("0.66", free_form("float", "0.6", 1), 0.0),
  ("[2007, 2008]", free_form("list", "[2007, 2008]"), 1.0),
  ("between 2007 and 2008", free_form("list", "[2007, 2008]"), 1.0),
  ("The answer is blue.", free_form("text", "blue"), 1.0),
  ("red", free_form("text", "blue"), 0.0),
])
def test_free_form_scores(response, metadata, expected):
  assert math_vista_score(response, metadata) == expected


def test_rule_based_extraction_values():
  assert rule_based_extract_answer("x = 12, so y = 7", free_form("integer", "7")) == "7"
  assert rule_based_extract_answer("The answer is (D)", multi_choice()) == "D"
  assert rule_based_extract_answer("maybe 3/5", multi_choice()) == "D"
  assert rule_based_extract_answer("no clue", multi_choice()) == "no clue"


@pytest.mark.parametrize("extraction,question_type,answer_type,precision,expected", [
  ("B", "multi_choice", "text", None, "8/11"),
  ("(C) 6/11", "multi_choice", "text", None, "6/11"),  # no "X:": nearest text by distance
  ("C: 6/11", "multi_choice", "text", None, "6/11"),
  ("Answer: B", "multi_choice", "text", None, "3/5"),  # official quirk: "r:" is read as R
  ("3.7", "free_form", "integer", None, "3"),
  ("x", "free_form", "integer", None, None),
  ("1.456", "free_form", "float", 2, "1.46"),
  ("1.456", "free_form", "float", None, None),
  ("[1, 2]", "free_form", "list", None, "[1, 2]"),
])
def test_normalize_extracted_answer(extraction, question_type, answer_type, precision, expected):
  choices = CHOICES if question_type == "multi_choice" else None
  assert normalize_extracted_answer(extraction, choices, question_type, answer_type,
                                    precision) == expected


def test_custom_extractor_hook_is_used_only_when_needed():
  calls = []

  def extractor(response, metadata):
    calls.append((response, metadata["query"]))
    return "C"

  assert math_vista_score("a long explanation", multi_choice("6/11"), extractor=extractor) == 1.0
  assert calls == [("a long explanation", "What fraction of the shape is blue?")]
  assert math_vista_score("14", free_form("integer", "14"), extractor=extractor) == 1.0
  assert len(calls) == 1                            # integer responses skip the extractor


def test_missing_metadata_raises():
  with pytest.raises(KeyError, match="precision"):
    math_vista_score("1", dict(question_type="free_form", answer_type="integer", choices=None,
                               answer="1"))


def test_simplify_question():
  question = "Hint: Please answer the question.\nQuestion: What is x?\nChoices:\nA: 1\nB: 2"
  assert simplify_math_vista_question(question) == "What is x?\nChoices:\nA: 1\nB: 2"
  assert simplify_math_vista_question("Question: How many? Hint: count them") == "How many?"
