"""The benchmark registry and its answer checks."""

from __future__ import annotations

import pytest

from merv.data.benchmarks import REGISTRY, check_question, lookup

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
