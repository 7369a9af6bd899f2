"""Reading evaluation results into per-question scores: model -> benchmark -> a matrix ``[seeds, questions]`` of the
benchmark's headline metric, with each question's type; and the statistics the tables show (a mean with its 95%
CI per model, benchmark and question type; paired comparisons of two models).

A run's ``eval.json`` gives each benchmark's headline metric (``metric``, ``value``); the per-question rows are in
the merged evaluation result beside it, ``eval/<benchmark>.json`` (:func:`merv.eval.merge.merge_results`:
``rows`` with ``question_id``, ``question_type`` and the scoring fields). A question's score is the headline
metric's for that row (:data:`ROW_SCORE`): 0/1 correctness for the accuracies and exact match, the judge's yes for
``judge_accuracy`` (a row the judge never scored has none, as in the summary). Every run of a model must have
scored the same questions of the same benchmarks with the same metric; the mean of each run's rows must be its
``eval.json``'s value (a stale or foreign rows file is refused).

Question types come from the rows, else from the benchmark's ``test_q.json`` (config ``data``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merv.report.config import ReportConfig, ReportModel
from merv.report.stats import Comparison, Estimate, align_questions, bootstrap_ci, paired_comparison

OVERALL = "all"
BOOTSTRAP_SEED = 0  # one fixed seed: two reports of the same results are the same bytes
RESAMPLES = 10_000


def _judge_yes(row: dict) -> float | None:
    verdict = row.get("verdict")
    return float(verdict["pred"] == "yes") if verdict else None


# headline metric -> a row's score (None: the row has no score under it)
ROW_SCORE: dict[str, Callable[[dict], float | None]] = {
    "accuracy_generate_firstchar": lambda r: float(r["correct_generate"]) if "correct_generate" in r else None,
    "accuracy_likelihood": lambda r: float(r["likelihood"]["correct"]) if "likelihood" in r else None,
    "exact_match": lambda r: float(r["exact_match"]) if "exact_match" in r else None,
    "judge_accuracy": _judge_yes,
}


@dataclass(frozen=True)
class BenchmarkScores:
    """One model's scores on one benchmark: per (seed, question) the headline metric's score."""

    metric: str
    chance: float | None
    seeds: tuple[int, ...]
    question_ids: tuple[str, ...]  # sorted
    question_types: tuple[str | None, ...]  # per question
    scores: np.ndarray  # [seeds, questions]

    def types(self) -> list[str]:
        """The question types present, sorted (empty when the benchmark has none)."""
        return sorted({t for t in self.question_types if t is not None})

    def of_type(self, qtype: str = OVERALL) -> np.ndarray:
        """``[seeds, questions of qtype]`` (``OVERALL``: every question)."""
        if qtype == OVERALL:
            return self.scores
        return self.scores[:, [i for i, t in enumerate(self.question_types) if t == qtype]]


Results = dict[str, dict[str, BenchmarkScores]]  # model -> benchmark -> scores
Estimates = dict[str, dict[str, dict[str, Estimate]]]  # model -> benchmark -> question type (OVERALL first) -> CI


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def question_types(bench_dir: str | Path) -> dict[str, str]:
    """``question_id -> question_type`` of a MERV ``eval_data`` benchmark (empty when it has no types)."""
    questions = read_json(Path(bench_dir) / "test_q.json", "benchmark questions")
    return {str(q["question_id"]): q["question_type"] for q in questions if q.get("question_type") is not None}


def rows_path(eval_json: str | Path, bench: str) -> Path:
    """Where a run's per-question rows of ``bench`` are: the merged result ``eval/<bench>.json`` beside eval.json."""
    return Path(eval_json).parent / "eval" / f"{bench}.json"


def run_scores(eval_json: str | Path, bench: str, entry: dict) -> tuple[dict[str, float], dict[str, str]]:
    """One run's ``{question_id: score}`` of ``bench`` under its headline metric, and the rows' question types;
    checked against ``entry`` (the benchmark's summary in ``eval.json``)."""
    path = rows_path(eval_json, bench)
    where = f"{path} (per-question results of {eval_json})"
    result = read_json(path, "per-question results")
    if not isinstance(result.get("rows"), list):
        raise ValueError(f"{where}: no 'rows' (not a merged evaluation result: merv merge writes them)")
    if result.get("benchmark", bench) != bench:
        raise ValueError(f"{where}: holds benchmark {result['benchmark']!r}, not {bench!r}")
    metric = entry["metric"]
    if metric not in ROW_SCORE:
        raise ValueError(f"{eval_json}: benchmark {bench!r}: no per-question score for metric {metric!r}; "
                         f"known: {sorted(ROW_SCORE)}")  # fmt: skip
    scores, types = {}, {}
    for row in result["rows"]:
        qid = str(row["question_id"])
        if qid in scores:
            raise ValueError(f"{where}: question {qid!r} answered twice")
        score = ROW_SCORE[metric](row)
        if score is None:
            continue
        scores[qid] = score
        if row.get("question_type") is not None:
            types[qid] = row["question_type"]
    if not scores:
        raise ValueError(f"{where}: no question has a {metric} score")
    mean = sum(scores.values()) / len(scores)
    if entry.get("value") is None or abs(mean - entry["value"]) > 1e-9:
        raise ValueError(f"{where}: its rows give {metric} {mean:.6f} over {len(scores)} questions, eval.json says "
                         f"{entry.get('value')} (a stale or foreign rows file?)")  # fmt: skip
    return scores, types


def model_scores(model: ReportModel, types_by_bench: dict[str, dict[str, str]]) -> dict[str, BenchmarkScores]:
    """``benchmark -> BenchmarkScores`` over a model's runs: every run must have evaluated the same benchmarks with
    the same metric and scored the same questions (else an error naming the model, the seed and what differs)."""
    evals = {run.seed: read_json(run.results, "model results") for run in model.runs}
    benches = {seed: list(data.get("benchmarks") or {}) for seed, data in evals.items()}
    first = model.runs[0].seed
    for seed, names in benches.items():
        if set(names) != set(benches[first]):
            raise ValueError(f"model {model.name!r}: seed {seed} evaluated benchmarks {sorted(names)}, seed {first} "
                             f"{sorted(benches[first])}")  # fmt: skip
    out = {}
    for bench in benches[first]:
        entries = {run.seed: evals[run.seed]["benchmarks"][bench] for run in model.runs}
        metrics = {seed: e["metric"] for seed, e in entries.items()}
        if len(set(metrics.values())) > 1:
            raise ValueError(f"model {model.name!r}, benchmark {bench!r}: the seeds' metrics differ: {metrics}")
        per_seed = [run_scores(run.results, bench, entries[run.seed]) for run in model.runs]
        ids, matrix = align_questions(
            [scores for scores, _ in per_seed], f"model {model.name!r}, benchmark {bench!r}", list(model.seeds)
        )
        types = {**types_by_bench.get(bench, {}), **per_seed[0][1]}
        out[bench] = BenchmarkScores(
            metric=metrics[first],
            chance=entries[first].get("chance"),
            seeds=model.seeds,
            question_ids=tuple(ids),
            question_types=tuple(types.get(q) for q in ids),
            scores=matrix,
        )
    return out


def load_results(cfg: ReportConfig) -> Results:
    """Every configured model's per-question scores over its runs (see the module docstring)."""
    types = {b.name: question_types(b.data) for b in cfg.benchmarks if b.data}
    return {m.name: model_scores(m, types) for m in cfg.models}


def estimate(scores: BenchmarkScores, qtype: str = OVERALL) -> Estimate:
    """Mean of one model's scores (of one question type) with its 95% bootstrap CI over seeds and questions."""
    return bootstrap_ci(scores.of_type(qtype), resamples=RESAMPLES, seed=BOOTSTRAP_SEED)


def estimates(results: Results) -> Estimates:
    """:func:`estimate` of every model, benchmark and question type (``OVERALL`` first, then the types sorted)."""
    return {
        model: {bench: {t: estimate(s, t) for t in [OVERALL, *s.types()]} for bench, s in by_bench.items()}
        for model, by_bench in results.items()
    }


def compare(results: Results, a: str, b: str, bench: str, qtype: str = OVERALL) -> Comparison:
    """Model ``a`` vs model ``b`` on ``bench`` (questions of ``qtype``), paired per question and per seed: both must
    have the same seeds and questions (else an error naming them)."""
    x, y = results[a][bench], results[b][bench]
    where = f"paired comparison {a!r} vs {b!r} on {bench!r}"
    if set(x.seeds) != set(y.seeds):
        raise ValueError(f"{where}: the models were trained with other seeds ({list(x.seeds)} vs {list(y.seeds)}); "
                         "a paired comparison needs the same seeds")  # fmt: skip
    if x.question_ids != y.question_ids:
        only_a = sorted(set(x.question_ids) - set(y.question_ids))[:5]
        only_b = sorted(set(y.question_ids) - set(x.question_ids))[:5]
        raise ValueError(f"{where}: other questions (only {a!r}: {only_a}; only {b!r}: {only_b})")
    y_rows = y.of_type(qtype)[[y.seeds.index(s) for s in x.seeds]]  # b's seeds in a's order
    return paired_comparison(x.of_type(qtype), y_rows, resamples=RESAMPLES, seed=BOOTSTRAP_SEED)


def model_encoders(cfg: ReportConfig, name: str) -> tuple[str, ...]:
    """The encoder ids of a model, from its first run's checkpoint config (``config.json``)."""
    from merv.config import load_run_config

    checkpoint = cfg.model(name).checkpoint
    if checkpoint is None:
        raise ValueError(f"report: model {name!r} has no checkpoint to read its encoders from")
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"report: model {name!r}: {path} not found (its checkpoint's config)")
    return tuple(e.id for e in load_run_config(path).model.encoders)


def benchmark_names(cfg: ReportConfig, results: Results, models: tuple[str, ...]) -> list[str]:
    """Configured benchmarks, in config order, that at least one of ``models`` was evaluated on."""
    return [b.name for b in cfg.benchmarks if any(b.name in results[m] for m in models)]


def type_names(results: Results, models: tuple[str, ...], bench: str) -> list[str]:
    """The question types of ``bench`` across models, sorted (overall excluded)."""
    return sorted({t for m in models if bench in results[m] for t in results[m][bench].types()})
