"""Scoring of answered questions and the summary a benchmark result reports.

Multiple choice by generation follows the original MERV scoring: the first character of the stripped prediction
must be the answer's option letter, in either case (``accuracy_generate_firstchar``). Multiple choice by likelihood
picks the option letter with the highest log-probability (``accuracy_likelihood``). Open-ended: the Video-ChatGPT
judge protocol (``judge_accuracy`` = yes / (yes + no), ``judge_score`` = mean score of the judged) when a judge was
used, and normalised exact match (``exact_match``) always.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from merv.prompting import option_letters

# A unit of 1-8 characters repeated at least 4 times in a row, covering at least half of the prediction.
_REPEAT = re.compile(r"(.{1,8}?)\1{3,}", re.S)


def first_char_letter(prediction: str) -> str:
    """MERV's letter extraction: the first character of the stripped prediction, upper-cased ('' when empty): the
    original compares it with the option letter case-insensitively (``pred.lower()[:1] == letter.lower()``)."""
    first = prediction.strip()[:1]
    return first.upper() if first in string.ascii_letters else first


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (exact match compares these)."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def degenerate_kinds(prediction: str, num_options: int | None = None) -> list[str]:
    """Why a generated answer is degenerate: ``empty``, ``repeated`` (a short unit repeated over at least half of
    an answer of 8+ characters), ``no_option_letter`` (MCQ: its first character is not an option letter)."""
    stripped = prediction.strip()
    kinds = []
    if not stripped:
        kinds.append("empty")
    elif len(stripped) >= 8:
        longest = max((m.end() - m.start() for m in _REPEAT.finditer(stripped)), default=0)
        if longest * 2 >= len(stripped):
            kinds.append("repeated")
    if num_options is not None and first_char_letter(prediction) not in option_letters(num_options):
        kinds.append("no_option_letter")
    return kinds


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict], kind: str, *, with_types: bool = True) -> dict:
    """Metrics of answered rows (see merv.eval.benchmark for the row fields). The headline is ``metric``/``value``."""
    metrics: dict[str, float | None] = {}
    out: dict = {"n": len(rows)}
    if kind == "mcq":
        out["chance"] = _mean([1 / r["num_options"] for r in rows])  # a reference point, not a model metric
        generated = [r for r in rows if "prediction" in r]
        scored = [r for r in rows if "likelihood" in r]
        if generated:
            metrics["accuracy_generate_firstchar"] = _mean([float(r["correct_generate"]) for r in generated])
        if scored:
            metrics["accuracy_likelihood"] = _mean([float(r["likelihood"]["correct"]) for r in scored])
        both = [r for r in rows if "prediction" in r and "likelihood" in r]
        if both:
            metrics["agreement_generate_likelihood"] = _mean(
                [float(r["letter"] == r["likelihood"]["choice"]) for r in both]
            )
        headline = "accuracy_generate_firstchar" if generated else "accuracy_likelihood"
    else:
        metrics["exact_match"] = _mean([float(r["exact_match"]) for r in rows])
        headline = "exact_match"
        if any("verdict" in r or "unjudged" in r for r in rows):
            judged = [r["verdict"] for r in rows if r.get("verdict")]
            metrics["judge_accuracy"] = _mean([float(v["pred"] == "yes") for v in judged])
            metrics["judge_score"] = _mean([float(v["score"]) for v in judged])
            out["judged"] = len(judged)
            out["unjudged"] = len(rows) - len(judged)
            if counted := sum(1 for v in judged if "counted_as_no" in v):  # judge unparseable: no
                out["counted_as_no"] = counted
            headline = "judge_accuracy"
    degenerate = Counter(k for r in rows for k in r.get("degenerate", []))
    out = {"metric": headline, "value": metrics.get(headline), **out, "metrics": metrics}
    if any("prediction" in r for r in rows):
        keys = ("empty", "repeated") + (("no_option_letter",) if kind == "mcq" else ())
        out["degenerate"] = {k: degenerate.get(k, 0) for k in keys}
    if with_types and any(r.get("question_type") is not None for r in rows):
        out["by_type"] = _by_type(rows, kind)
    return out


def _by_type(rows: list[dict], kind: str) -> dict:
    """The summary of each question type's rows, reduced to counts and metrics."""
    kept = ("n", "chance", "metrics", "judged", "unjudged", "counted_as_no")
    types = sorted({r["question_type"] for r in rows if r.get("question_type") is not None})
    by_type = {}
    for qtype in types:
        summary = summarise([r for r in rows if r.get("question_type") == qtype], kind, with_types=False)
        by_type[qtype] = {k: v for k, v in summary.items() if k in kept}
    return by_type
