"""The benchmark registry, answer checks, MERV's letter rule and degenerate outputs."""

from __future__ import annotations

import pytest

from merv.eval.metrics import degenerate_kinds, first_char_letter, normalise, summarise
from merv.eval.registry import REGISTRY, check_question, lookup

PAPER = {
    "msvd_qa": "open",
    "msrvtt_qa": "open",
    "tgif_qa": "open",
    "activitynet_qa": "open",
    "perception_test": "mcq",
    "nextqa": "mcq",
    "vlep": "mcq",
    "tvqa": "mcq",
}


def test_the_papers_benchmarks_are_registered_with_their_protocol():
    for name, kind in PAPER.items():
        spec = REGISTRY[name]
        assert spec.kind == kind and spec.answer_field == ("answer_id" if kind == "mcq" else "answer")
        assert spec.max_new_tokens == 512 and spec.registered
    assert lookup("MSVD-QA").name == "msvd_qa" and lookup("ActivityNet").name == "activitynet_qa"
    assert lookup("Perception Test").name == "perception_test" and lookup("NExT-QA").name == "nextqa"
    assert lookup("synth_mcq").max_new_tokens == 8


def test_an_unregistered_benchmark_gets_a_generic_entry_from_its_questions():
    mcq = lookup("my_bench", {"question": "q", "options": ["a", "b"]})
    assert (mcq.kind, mcq.answer_field, mcq.registered) == ("mcq", "answer_id", False)
    assert lookup("my_open", {"question": "q"}).kind == "open"
    with pytest.raises(ValueError, match="not registered"):
        lookup("my_bench")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question_id": "q7", "options": ["a", "b"]}, "question 'q7' has no 'answer_id'"),
        ({"question_id": "q8", "options": ["a", "b"], "answer_id": 2}, "answer_id 2 outside its 2 options"),
        ({"question_id": "q9", "options": "a,b", "answer_id": 0}, "question 'q9' needs a list of 1 to 26 'options'"),
    ],
)
def test_bad_questions_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        check_question(REGISTRY["nextqa"], record)


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
