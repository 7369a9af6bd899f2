"""The pipeline configuration (``config/config.yaml``) seen from Python: what Snakemake's rules and ``merv status``
share.

``models`` lists every configured model (any of them can be a Snakemake target); ``pipeline.models`` the ones that
``snakemake`` (rule ``all``) and ``dvc repro`` build by default. A model's weights are built locally (``tiny``,
``standin``: into ``data/weights/<model>/built``) or fetched (``fetch``). Its frames come from the smallest shard set
(``shards.sets``) that stores every encoder's frame count at no less than its input size, so a tiny model and a
paper-size model in the same config read different shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merv.config import RunConfig, parse_config, resolve_run_config
from merv.fetch import with_local_weights
from merv.pretrain.config import PretrainConfig
from merv.settings import (
    ComputeSection,
    DataSection,
    EvalSection,
    LaunchSection,
    ModelEntry,
    PipelineSection,
    ReportSection,
    ShardsSection,
    SynthSection,
)

BUILT_WEIGHTS = "data/weights/{model}/built"
FETCHED_WEIGHTS = "data/weights/{model}/fetched.json"
REPORT_DIR = "results/tables"


@dataclass(frozen=True)
class PipelineConfig:
    """The whole ``config/config.yaml``, typed: a section's record (and so its defaults) is :mod:`merv.settings`'s,
    the pretrain entries' :class:`merv.pretrain.config.PretrainConfig`."""

    pipeline: PipelineSection
    data: DataSection
    models: dict[str, ModelEntry]
    synth: SynthSection = SynthSection()
    shards: ShardsSection = field(default_factory=ShardsSection)
    pretrain: dict[str, PretrainConfig] = field(default_factory=dict)
    report: ReportSection = ReportSection()
    launch: LaunchSection = LaunchSection()
    compute: ComputeSection = ComputeSection()
    eval: EvalSection = EvalSection()


def parse_pipeline_config(config: dict) -> PipelineConfig:
    """The pipeline config, every key known and typed (a ``ValueError`` names the first key that is not)."""
    return parse_config(PipelineConfig, config, "config")


def selected_models(config: dict) -> list[str]:
    """The models built by default, checked against the configured ones."""
    selected = config["pipeline"]["models"]
    unknown = [m for m in selected if m not in config["models"]]
    if unknown:
        known = sorted(config["models"])
        raise ValueError(f"pipeline.models names {unknown}, which `models` does not define (it has {known})")
    return list(selected)


def model_run(config: dict, model: str) -> RunConfig:
    """The typed run config of a configured model: its preset, patched by its overrides, with built weights' paths
    (and pretrained encoders' paths where the entry names them)."""
    from merv.pretrain.config import with_pretrained_encoders

    entry = config["models"][model]
    run = resolve_run_config(entry["preset"], entry.get("overrides") or {})
    if weights_kind(config, model) != "fetch":
        run = with_local_weights(run, BUILT_WEIGHTS.format(model=model))
    return with_pretrained_encoders(run, pretrained_encoders(config, model), pretrain_specs(config))


def pretrain_specs(config: dict) -> dict:
    """``{name: PretrainConfig}`` of config ``pretrain`` (typed and checked)."""
    from merv.pretrain.config import pretrain_config_from_dict

    return {
        name: pretrain_config_from_dict(spec, f"pretrain.{name}")
        for name, spec in (config.get("pretrain") or {}).items()
    }


def pretrained_encoders(config: dict, model: str) -> dict[str, str]:
    """``{encoder id: pretrain name}`` of a model: the encoders whose weights the pretrain stage makes."""
    return config["models"][model].get("pretrained_encoders") or {}


def weights_inputs(config: dict, model: str) -> list[str]:
    """Everything a model's weights are: the marker of its built or fetched weights and its pretrained encoders."""
    from merv.pretrain.config import PRETRAINED_DIR

    names = sorted(set(pretrained_encoders(config, model).values()))
    return [weights_marker(config, model)] + [f"{PRETRAINED_DIR}/{name}" for name in names]


def weights_kind(config: dict, model: str) -> str:
    return config["models"][model].get("weights", ModelEntry.weights)


def weights_marker(config: dict, model: str) -> str:
    """The pipeline's output that stands for a model's weights being in place."""
    template = FETCHED_WEIGHTS if weights_kind(config, model) == "fetch" else BUILT_WEIGHTS
    return template.format(model=model)


def shard_set(config: dict, model: str, run: RunConfig) -> str:
    """Name of the smallest shard set that holds every encoder's frames at the short side its resize needs (its input
    size, or more for a centre crop; see merv.data.transforms), or a clear error."""
    from merv.data.transforms import frame_size

    sets = config["shards"]["sets"]
    need_frames = {e.num_frames for e in run.model.encoders}
    need_size = frame_size(run.model.encoders, read_weights=False)
    fitting = [name for name, s in sets.items() if need_frames <= set(s["frames"]) and s["size"] >= need_size]
    if not fitting:
        have = "; ".join(f"{n}: {s['size']}px, frames {s['frames']}" for n, s in sets.items())
        raise ValueError(
            f"model {model!r} needs frames {sorted(need_frames)} at {need_size}px, which no shard set stores "
            f"(shards.sets has {have}); add a set or extend one"
        )
    return min(fitting, key=lambda n: (sets[n]["size"], len(sets[n]["frames"]), n))


def report_models(config: dict) -> list[str]:
    """Every model the report shows, in config order (checked against ``models``)."""
    report = config.get("report") or {}
    named = set(report.get("main", [])) | set(report.get("fusion_ablation", []))
    if report.get("fusion_weights"):
        named.add(report["fusion_weights"]["model"])
    unknown = sorted(named - set(config["models"]))
    if unknown:
        raise ValueError(f"report names model(s) {unknown} that config models does not define")
    return [m for m in config["models"] if m in named]


def report_outputs(config: dict) -> list[str]:
    """What the tables job writes (results/tables/...): :func:`merv.report.tables.report_files` of config ``report``."""
    from merv.report.tables import report_files

    report = config.get("report") or {}
    names = report_files(bool(report.get("fusion_ablation")), bool(report.get("fusion_weights")))
    return [f"{REPORT_DIR}/{name}" for name in names]


def check_stage_data(config: dict, model: str, run: RunConfig) -> None:
    """Every training stage reads a split that data.train defines."""
    for stage in run.train.stages:
        if stage.data not in config["data"]["train"]:
            raise ValueError(
                f"model {model!r} stage {stage.name!r} trains on data {stage.data!r}, "
                f"which config data.train does not define (it has {sorted(config['data']['train'])})"
            )
