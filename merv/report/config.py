"""What `merv report` reports: the models (each trained with one or more seeds: per seed its results and
checkpoint), the benchmarks (questions, shards) and each table's rows, parsed from the pipeline's report spec with
errors naming the key.

The spec (``merv report --spec``, inline JSON or a JSON file)::

    {"models": [{"name": "merv_tiny",
                 "runs": [{"seed": 0, "results": "results/merv_tiny/seed-0/eval.json",
                           "checkpoint": "results/merv_tiny/seed-0/train/finetune"}, ...]}, ...],
     "benchmarks": [{"name": "synth_mcq", "data": "data/eval_data/synth_mcq", "shards": "data/shards/..."}, ...],
     "main": ["merv_tiny", "tiny_appearance", ...], "fusion_ablation": [...],
     "fusion_weights_model": "merv_tiny", "fusion_weights_benchmark": "synth_mcq"}

Each run's per-question results are read from ``eval/<benchmark>.json`` next to its ``eval.json`` (the merged
evaluation, :mod:`merv.eval.merge`). What needs one checkpoint (the ablation's cost, the fusion-weight figure, which
encoders a model has) takes the model's first run's.
"""

from __future__ import annotations

from dataclasses import dataclass

from merv.config import parse_config, read_json_spec


@dataclass(frozen=True)
class ReportRun:
    seed: int  # the training seed: runs of two models with the same seed are paired in the comparisons
    results: str  # results/<model>/seed-<s>/eval.json (per-question rows in eval/<benchmark>.json beside it)
    checkpoint: str | None = None  # final checkpoint folder: the ablation's cost, the fusion weights, the encoders


@dataclass(frozen=True)
class ReportModel:
    name: str
    runs: tuple[ReportRun, ...]

    def __post_init__(self):
        if not self.runs:
            raise ValueError(f"model {self.name!r} has no runs (at least one seed's results are needed)")
        seeds = [r.seed for r in self.runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"model {self.name!r} lists seed(s) {repeated} more than once (seeds: {seeds})")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)

    @property
    def checkpoint(self) -> str | None:
        """The first run's checkpoint: what needs one model (cost, fusion weights, encoders) uses it."""
        return self.runs[0].checkpoint


@dataclass(frozen=True)
class ReportBenchmark:
    name: str
    data: str | None = None  # eval_data folder (its test_q.json gives question types rows do not carry)
    shards: str | None = None  # shard folder (the fusion-weight figure runs the model over it)


@dataclass(frozen=True)
class ReportConfig:
    models: tuple[ReportModel, ...]
    benchmarks: tuple[ReportBenchmark, ...]
    main: tuple[str, ...]  # rows of the main table
    fusion_ablation: tuple[str, ...] = ()  # rows of the fusion-ablation table
    fusion_weights_model: str | None = None  # a model with per-sample fusion weights (cross_attention)
    fusion_weights_benchmark: str | None = None

    def __post_init__(self):
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"report.models: model(s) {repeated} listed more than once")
        for key in ("main", "fusion_ablation"):
            unknown = [m for m in getattr(self, key) if m not in names]
            if unknown:
                raise ValueError(f"report.{key}: unknown model(s) {unknown}; configured: {names}")
        if self.fusion_weights_model is not None:
            model = self.model(self.fusion_weights_model)
            bench = self.benchmark(self.fusion_weights_benchmark)
            if model.checkpoint is None or bench.shards is None:
                raise ValueError(
                    "report: the fusion-weight figure needs the model's (first run's) checkpoint and the benchmark's "
                    "shards"
                )
        for key, why in (("main", "for its encoders: fused or single"), ("fusion_ablation", "for its cost")):
            for name in getattr(self, key):
                if self.model(name).checkpoint is None:
                    raise ValueError(f"report.{key}: model {name!r} needs its first run's checkpoint ({why})")

    def model(self, name: str) -> ReportModel:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"report: unknown model {name!r}; configured: {[m.name for m in self.models]}")

    def benchmark(self, name: str | None) -> ReportBenchmark:
        for b in self.benchmarks:
            if b.name == name:
                return b
        raise ValueError(f"report: unknown benchmark {name!r}; configured: {[b.name for b in self.benchmarks]}")


def report_config_from_dict(data: dict, where: str = "report") -> ReportConfig:
    """The report spec (`merv report --spec`) as a :class:`ReportConfig`."""
    return parse_config(ReportConfig, data, where)


def read_report_spec(spec: str, where: str = "--spec") -> ReportConfig:
    """``spec``: inline JSON (it starts with ``{``) or the path of a JSON file holding it."""
    return report_config_from_dict(*read_json_spec(spec, where))
