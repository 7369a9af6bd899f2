import pytest

from merv.eval.benchmark import evaluate, normalise, parse_letter, question_prompt, score


@pytest.mark.parametrize(
    ("prediction", "n", "letter"),
    [
        ("B", 4, "B"),
        ("B.", 4, "B"),
        ("(C) dog", 4, "C"),
        (" A red thing", 4, "A"),
        ("Answer: D", 4, "D"),
        ("E", 4, None),
        ("blue", 4, None),
        ("", 3, None),
    ],
)
def test_parse_letter(prediction, n, letter):
    assert parse_letter(prediction, n) == letter


def test_score_mcq_and_open():
    mcq = {"kind": "mcq", "options": ["red", "blue"], "answer_id": 1, "answer": "blue"}
    assert score(mcq, "B") and not score(mcq, "A") and not score(mcq, "blue")
    open_q = {"kind": "open", "answer": "Left"}
    assert score(open_q, "left.") and not score(open_q, "right")
    assert normalise("  The  LEFT! ") == "the left"


def test_mcq_prompt_lists_options(tiny_model):
    prompt = question_prompt(tiny_model, {"kind": "mcq", "question": "Q?", "options": ["x", "y"]})
    assert prompt.startswith("In: Q? Select the correct answer") and prompt.endswith("A. x\nB. y\nOut:")


def test_evaluate_counts_and_chance(tiny_model, shards):
    result = evaluate(tiny_model, shards["synth_mcq"], batch_size=4, max_new_tokens=2)
    assert result["metric"] == "accuracy" and result["n"] == 6 == len(result["predictions"])
    expected_chance = sum(1 / 3 if "shape" in p["question_id"] else 1 / 4 for p in result["predictions"]) / 6
    assert result["chance"] == pytest.approx(expected_chance)
    assert result["value"] == sum(p["correct"] for p in result["predictions"]) / 6
    open_result = evaluate(tiny_model, shards["synth_open"], batch_size=4, max_new_tokens=2)
    assert open_result["metric"] == "exact_match" and "chance" not in open_result
