"""What `merv report` reports: the models (results, checkpoints), the benchmarks (questions, shards) and each
table's rows, parsed from the pipeline's report spec with errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass

from merv.config import parse_config


@dataclass(frozen=True)
class ReportModel:
    name: str
    results: str  # results/<model>/eval.json
    checkpoint: str | None = None  # final checkpoint folder: needed for the ablation's cost and the fusion weights


@dataclass(frozen=True)
class ReportBenchmark:
    name: str
    data: str | None = None  # eval_data folder (its test_q.json gives question types)
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
        for key in ("main", "fusion_ablation"):
            unknown = [m for m in getattr(self, key) if m not in names]
            if unknown:
                raise ValueError(f"report.{key}: unknown model(s) {unknown}; configured: {names}")
        if self.fusion_weights_model is not None:
            model = self.model(self.fusion_weights_model)
            bench = self.benchmark(self.fusion_weights_benchmark)
            if model.checkpoint is None or bench.shards is None:
                raise ValueError(
                    "report: the fusion-weight figure needs the model's checkpoint and the benchmark's shards"
                )
        for name in self.fusion_ablation:
            if self.model(name).checkpoint is None:
                raise ValueError(f"report.fusion_ablation: model {name!r} needs a checkpoint (for its cost)")

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
