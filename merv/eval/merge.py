"""Join the chunk results of one benchmark, checking that every question is answered exactly once
(:func:`merge_files`, ``merv merge``), and a model's benchmark results into its ``eval.json``
(:func:`collect_results`, ``merv collect``), and a model's seeds into ``results/<model>/eval.json``
(:func:`collect_seeds`, ``merv collect-seeds``).

Each chunk result carries the benchmark's question count and a digest of all its question ids in order, the ids
it was assigned and its rows. The merge refuses -- naming what is wrong -- chunks of different benchmarks or
settings, a missing or repeated chunk, a chunk whose rows are not exactly its assigned questions (missing or
duplicate ids), and a union that is not the whole benchmark. The summary is recomputed from the merged rows.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from merv.config import fingerprint
from merv.eval.benchmark import RESULT_FORMAT, ids_digest
from merv.eval.metrics import summarise


class MergeError(ValueError):
    """Chunks that do not make exactly one answer per question of one benchmark."""


def _show(ids: list, limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check_same(chunks: list[tuple[str, dict]], field: str) -> None:
    first_path, first = chunks[0]
    for path, chunk in chunks[1:]:
        if chunk[field] != first[field]:
            raise MergeError(f"{path} and {first_path} differ in {field}: {chunk[field]!r} vs {first[field]!r}")


def merge_results(chunks: list[tuple[str, dict]]) -> dict:
    """``[(path, chunk result)]`` -> one result over the whole benchmark (chunk ``0 of 1``)."""
    if not chunks:
        raise MergeError("no chunk results to merge")
    for path, chunk in chunks:
        if chunk.get("format") != RESULT_FORMAT:
            raise MergeError(f"{path}: not a merv eval result ({RESULT_FORMAT})")
    for field in ("benchmark", "config_fingerprint", "questions"):
        _check_same(chunks, field)
    counts = {c["chunk"]["count"] for _, c in chunks}
    if len(counts) != 1:
        raise MergeError(f"chunks of different splits: chunk counts {sorted(counts)}")
    count = counts.pop()
    indexes = Counter(c["chunk"]["index"] for _, c in chunks)
    repeated = sorted(i for i, n in indexes.items() if n > 1)
    missing = sorted(set(range(count)) - set(indexes))
    if repeated or missing:
        raise MergeError(f"chunks of {count}: missing chunk indexes {missing}, repeated chunk indexes {repeated}")

    rows, order = [], []
    for path, chunk in sorted(chunks, key=lambda pc: pc[1]["chunk"]["index"]):
        answered = Counter(r["question_id"] for r in chunk["rows"])
        assigned = chunk["assigned"]
        absent = [i for i in assigned if i not in answered]
        twice = [i for i, n in answered.items() if n > 1]
        extra = [i for i in answered if i not in set(assigned)]
        if absent or twice or extra:
            problems = [
                f"missing question ids {_show(absent)}" if absent else "",
                f"duplicate question ids {_show(twice)}" if twice else "",
                f"question ids not assigned to it {_show(extra)}" if extra else "",
            ]
            raise MergeError(f"{path} (chunk {chunk['chunk']['index']}): " + "; ".join(p for p in problems if p))
        rows += chunk["rows"]
        order += assigned
    seen = Counter(order)
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        raise MergeError(f"question ids answered by more than one chunk: {_show(twice)}")
    expected = chunks[0][1]["benchmark_ids"]
    absent = [i for i in expected if i not in seen]
    extra = [i for i in seen if i not in set(expected)]
    if absent or extra or ids_digest(expected) != chunks[0][1]["questions"]["ids_sha256"]:
        raise MergeError(
            f"the chunks do not cover the benchmark: missing question ids {_show(absent)}; "
            f"unknown question ids {_show(extra)}"
        )

    first = chunks[0][1]
    manifest = dict(first["manifest"])
    if manifest.get("judge"):
        served = sorted({m for _, c in chunks for m in (c["manifest"].get("judge") or {}).get("served_models", [])})
        manifest["judge"] = {**manifest["judge"], "served_models": served}
    return {
        **{k: first[k] for k in ("format", "benchmark", "spec", "questions", "config_fingerprint")},
        "chunk": {"index": 0, "count": 1, "merged_from": count},
        "summary": summarise(rows, first["spec"]["kind"]),
        "manifest": manifest,
        "run": {"chunks": [{"path": str(p), **c["run"]} for p, c in chunks]},
        "benchmark_ids": expected,
        "assigned": order,
        "rows": rows,
    }


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def read_result(path: str | Path) -> dict:
    """A result file as strict JSON (a bare NaN or Infinity, which strict readers refuse, is an error)."""
    import json

    try:
        return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: cannot read result ({e})") from None


def merge_files(paths: list[str | Path]) -> dict:
    return merge_results([(str(path), read_result(path)) for path in paths])


def collect_results(paths: list[str | Path], model: str, seed: int | None = None) -> dict:
    """A model's ``eval.json``: the summary, question selection, fingerprint and manifest of each whole-benchmark
    result in ``paths`` (no rows), and a fingerprint over theirs. A chunk result is refused: merge it first."""
    benchmarks = {}
    for path in paths:
        r = read_result(path)
        if r.get("chunk", {}).get("count", 1) != 1:
            raise ValueError(f"{path}: a chunk result ({r['chunk']}); merge the chunks first (merv merge)")
        benchmarks[r["benchmark"]] = {
            **r["summary"],
            "questions": r["questions"],
            "config_fingerprint": r["config_fingerprint"],
            "manifest": r["manifest"],
        }
    out = {
        "model": model,
        "config_fingerprint": fingerprint(sorted(b["config_fingerprint"] for b in benchmarks.values())),
        "benchmarks": benchmarks,
    }
    return out if seed is None else {**out, "seed": seed}


def _seed_mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def collect_seeds(paths: list[str | Path], model: str) -> dict:
    """A model's ``results/<model>/eval.json`` over its seeds: per benchmark the headline metric's mean over seeds,
    each seed's value and the question count (every seed must score the same benchmarks with the same metric on
    the same number of questions). Confidence intervals need the per-question rows: ``merv report`` gives them."""
    runs = []
    for path in paths:
        r = read_result(path)
        if r.get("model") != model or "seed" not in r:
            raise ValueError(f"{path}: not a seed's eval.json of model {model!r} (model {r.get('model')!r}, "
                             f"seed {r.get('seed')!r}); make it with merv collect --seed")  # fmt: skip
        runs.append((str(path), r))
    seeds = [r["seed"] for _, r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"model {model!r}: a seed is given twice ({seeds})")
    first_path, first = runs[0]
    benchmarks = {}
    for name, b in first["benchmarks"].items():
        for path, r in runs[1:]:
            other = r["benchmarks"].get(name)
            if other is None or (other["metric"], other["n"]) != (b["metric"], b["n"]):
                raise ValueError(f"{path}: benchmark {name!r} differs from {first_path} (missing, or another metric "
                                 "or question count): the seeds must answer the same questions")  # fmt: skip
        values = {str(r["seed"]): r["benchmarks"][name]["value"] for _, r in runs}
        benchmarks[name] = {"metric": b["metric"], "value": _seed_mean(list(values.values())), "n": b["n"],
                            "by_seed": values}  # fmt: skip
    extra = sorted({n for _, r in runs for n in r["benchmarks"]} - set(benchmarks))
    if extra:
        raise ValueError(f"model {model!r}: benchmark(s) {extra} are scored under some seeds only")
    return {
        "model": model,
        "seeds": seeds,
        "config_fingerprint": fingerprint(sorted(r["config_fingerprint"] for _, r in runs)),
        "benchmarks": benchmarks,
    }
