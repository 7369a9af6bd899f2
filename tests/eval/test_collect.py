"""merv collect (merv.eval.merge.collect_results): whole-benchmark results into one eval.json; chunks refused."""

from __future__ import annotations

import json

import pytest

from merv.eval.merge import collect_results


def _result(bench: str, fp: str, chunk: dict | None = None) -> dict:
    return {
        "benchmark": bench,
        "summary": {"metric": "accuracy_generate_firstchar", "value": 0.5, "n": 4},
        "questions": {"limit": None},
        "config_fingerprint": fp,
        "manifest": {"judge": None},
        "chunk": chunk or {"index": 0, "count": 1},
        "rows": [{"question_id": "q1", "correct": True}],
    }


def test_collect_keeps_summaries_and_refuses_chunks(tmp_path):
    paths = []
    for bench, fp in (("a", "f1"), ("b", "f2")):
        paths.append(tmp_path / f"{bench}.json")
        paths[-1].write_text(json.dumps(_result(bench, fp)))
    out = collect_results(paths, "mine")
    assert out["model"] == "mine" and set(out["benchmarks"]) == {"a", "b"}
    assert out["benchmarks"]["a"]["value"] == 0.5 and "rows" not in out["benchmarks"]["a"]
    assert out["config_fingerprint"] == collect_results(paths[::-1], "mine")["config_fingerprint"]
    changed = _result("b", "f3")
    paths[1].write_text(json.dumps(changed))
    assert collect_results(paths, "mine")["config_fingerprint"] != out["config_fingerprint"]

    paths[1].write_text(json.dumps(_result("b", "f2", {"index": 1, "count": 2})))
    with pytest.raises(ValueError, match=r"b\.json: a chunk result .*merge the chunks first"):
        collect_results(paths, "mine")
