"""Evaluation results of made-up models, laid out and merged as the pipeline does: per seed, chunk results of each
benchmark (rows as merv.eval.benchmark writes them) joined by merv.eval.merge.merge_results into
``results/<model>/seed-<s>/eval/<bench>.json``, and merv.eval.merge.collect_results' ``eval.json`` beside them; a
checkpoint folder holding a grid preset's config (what the report reads a model's encoders from)."""

from __future__ import annotations

import json
from pathlib import Path

from merv.eval.benchmark import RESULT_FORMAT, ids_digest
from merv.eval.merge import collect_results, merge_results

TYPES = ("colour", "first_direction", "last_direction", "shape")


def question_ids(n: int) -> list[str]:
    return [f"q{i:04d}" for i in range(n)]


def qtype(qid: str) -> str:
    """Balanced types: question i has type i mod 4."""
    return TYPES[int(qid[1:]) % len(TYPES)]


def mcq_row(qid: str, correct: bool) -> dict:
    prediction = "A" if correct else "B"
    return {"question_id": qid, "question_type": qtype(qid), "answer": "A", "answer_text": "red", "num_options": 4,
            "prediction": prediction, "letter": prediction, "correct_generate": correct, "degenerate": []}  # fmt: skip


def open_row(qid: str, correct: bool) -> dict:
    prediction = "red" if correct else "blue"
    return {"question_id": qid, "question_type": qtype(qid), "answer": "red", "prediction": prediction,
            "exact_match": correct, "degenerate": []}  # fmt: skip


def chunk_results(bench: str, kind: str, rows: list[dict], chunks: int = 2) -> list[tuple[str, dict]]:
    """``rows`` (the whole benchmark, in order) as ``chunks`` chunk results of ``merv eval``."""
    ids = [r["question_id"] for r in rows]
    out = []
    for i in range(chunks):
        lo, hi = len(rows) * i // chunks, len(rows) * (i + 1) // chunks
        out.append((f"{bench}/chunk-{i}-of-{chunks}.json", {
            "format": RESULT_FORMAT, "benchmark": bench, "spec": {"kind": kind},
            "chunk": {"index": i, "count": chunks},
            "questions": {"total": len(ids), "ids_sha256": ids_digest(ids), "limit": None},
            "config_fingerprint": f"fp-{bench}", "summary": {}, "manifest": {"judge": None}, "run": {},
            "benchmark_ids": ids, "assigned": ids[lo:hi], "rows": rows[lo:hi],
        }))  # fmt: skip
    return out


def write_run(root: Path, model: str, seed: int, correct: dict[str, dict[str, bool]]) -> str:
    """One seed's results: ``correct[bench][question_id]`` (bench ``*_open`` is open-ended, else multiple choice),
    merged and collected as the pipeline does; returns the eval.json path."""
    run = root / "results" / model / f"seed-{seed}"
    (run / "eval").mkdir(parents=True, exist_ok=True)
    paths = []
    for bench, by_id in correct.items():
        kind = "open" if bench.endswith("_open") else "mcq"
        make = open_row if kind == "open" else mcq_row
        merged = merge_results(chunk_results(bench, kind, [make(q, c) for q, c in by_id.items()]))
        paths.append(run / "eval" / f"{bench}.json")
        paths[-1].write_text(json.dumps(merged))
    (run / "eval.json").write_text(json.dumps(collect_results(paths, model)))
    return str(run / "eval.json")


def write_checkpoint(root: Path, model: str, seed: int, preset: str) -> str:
    """A checkpoint folder with the resolved config of a grid preset (enough for the report's encoder lookup)."""
    from merv.config import resolve_run_config

    path = root / "results" / model / f"seed-{seed}" / "train" / "finetune"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(resolve_run_config(preset).to_dict()))
    return str(path)


def model_spec(root: Path, model: str, preset: str, by_seed: dict[int, dict[str, dict[str, bool]]]) -> dict:
    """A spec entry ``{name, runs}`` for one model whose seeds answered ``by_seed[seed][bench][question_id]``."""
    runs = [
        {
            "seed": s,
            "results": write_run(root, model, s, correct),
            "checkpoint": write_checkpoint(root, model, s, preset),
        }
        for s, correct in by_seed.items()
    ]
    return {"name": model, "runs": runs}
