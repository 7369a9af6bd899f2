"""merv collect (merv.eval.merge.collect_results): whole-benchmark results into one eval.json; chunks refused."""

from __future__ import annotations

import json

import pytest

from merv.eval.merge import collect_results, collect_seeds


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


def _seed_result(tmp_path, seed: int, value: float, n: int = 4, model: str = "mine", bench: str = "a"):
    """A seed's eval.json, made by collect_results from a whole-benchmark result."""
    result = _result(bench, f"f{seed}")
    result["summary"] = {**result["summary"], "value": value, "n": n}
    source = tmp_path / f"{bench}-{seed}.json"
    source.write_text(json.dumps(result))
    path = tmp_path / f"seed-{seed}.json"
    path.write_text(json.dumps(collect_results([source], model, seed)))
    return path


def test_collect_seeds_averages_each_benchmark_over_the_seeds(tmp_path):
    paths = [_seed_result(tmp_path, s, v) for s, v in ((0, 0.5), (1, 0.75), (2, 1.0))]
    out = collect_seeds(paths, "mine")
    assert out["seeds"] == [0, 1, 2] and out["model"] == "mine"
    assert out["benchmarks"]["a"] == {"metric": "accuracy_generate_firstchar", "value": 0.75, "n": 4,
                                      "by_seed": {"0": 0.5, "1": 0.75, "2": 1.0}}  # fmt: skip
    assert collect_seeds(paths[:2], "mine")["config_fingerprint"] != out["config_fingerprint"]


def test_collect_seeds_refuses_what_is_not_comparable(tmp_path):
    good = _seed_result(tmp_path, 0, 0.5)
    with pytest.raises(ValueError, match="a seed is given twice"):
        collect_seeds([good, good], "mine")
    other_n = _seed_result(tmp_path, 1, 0.5, n=5)
    with pytest.raises(ValueError, match="benchmark 'a' differs .* the seeds must answer the same questions"):
        collect_seeds([good, other_n], "mine")
    other_model = _seed_result(tmp_path, 2, 0.5, model="theirs")
    with pytest.raises(ValueError, match="not a seed's eval.json of model 'mine'"):
        collect_seeds([good, other_model], "mine")
    unseeded = tmp_path / "unseeded.json"
    unseeded.write_text(json.dumps(collect_results([tmp_path / "a-0.json"], "mine")))
    with pytest.raises(ValueError, match="make it with merv collect --seed"):
        collect_seeds([unseeded], "mine")
    extra = _seed_result(tmp_path, 3, 0.5, bench="b")
    with pytest.raises(ValueError, match="benchmark 'a' differs"):
        collect_seeds([good, extra], "mine")
