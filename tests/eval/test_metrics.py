"""MERV's letter rule, degenerate outputs and summaries."""

from __future__ import annotations

import pytest

from merv.eval.metrics import degenerate_kinds, first_char_letter, normalise, summarise


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [("B", "B"), (" B. dog", "B"), ("(B) dog", "("), ("b", "B"), ("b) dog", "B"), ("", ""), ("\n C", "C")],
)
def test_merv_letter_rule_is_the_first_character_in_either_case(prediction, letter):
    assert first_char_letter(prediction) == letter
    # the original's check: sample["pred"].lower()[:1] == sample["answer_char"].lower() (pred already stripped)
    for answer in "ABC":
        assert (first_char_letter(prediction) == answer) == (prediction.strip().lower()[:1] == answer.lower())


def test_lower_case_answers_count_and_are_not_degenerate():
    rows = [{"num_options": 2, "prediction": p, "correct_generate": first_char_letter(p) == "A"} for p in ("a", "B")]
    assert summarise(rows, "mcq")["metrics"]["accuracy_generate_firstchar"] == 0.5
    assert degenerate_kinds("a. yes", 2) == [] and degenerate_kinds("c", 2) == ["no_option_letter"]


@pytest.mark.parametrize(
    ("prediction", "options", "kinds"),
    [
        ("", 4, ["empty", "no_option_letter"]),
        ("   ", None, ["empty"]),
        ("AAAAAAAAAAAA", 4, ["repeated"]),
        ("the the the the the", None, ["repeated"]),
        ("E", 4, ["no_option_letter"]),
        ("A", 4, []),
        ("A red circle moves left, then up.", None, []),
        ("1000000 dollars", None, []),  # a short run inside a real answer is not degenerate
    ],
)
def test_degenerate_outputs(prediction, options, kinds):
    assert degenerate_kinds(prediction, options) == kinds


def test_summary_of_judged_rows_counts_unjudged_apart():
    rows = [
        {"answer": "a", "prediction": "a", "exact_match": True, "verdict": {"pred": "yes", "score": 5}},
        {"answer": "b", "prediction": "c", "exact_match": False, "verdict": {"pred": "no", "score": 1}},
        {"answer": "d", "prediction": "", "exact_match": False, "unjudged": "unparseable", "degenerate": ["empty"]},
    ]
    s = summarise(rows, "open")
    assert (s["metric"], s["value"], s["judged"], s["unjudged"]) == ("judge_accuracy", 0.5, 2, 1)
    assert s["metrics"]["judge_score"] == 3.0 and s["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert s["degenerate"] == {"empty": 1, "repeated": 0}
    assert normalise("  The LEFT! ") == "the left"
