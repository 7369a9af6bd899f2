"""What the Snakemake rules compute, as plain Python: every path, input, job file and command-line option of the
pipeline, from the config (``config/config.yaml``). ``workflow/rules/*.smk`` only wire these into rules, so the
logic is tested here (tests/test_workflow.py) and not only reachable through ``snakemake -n``.

A job's configuration is never a JSON blob on its command line: :meth:`Workflow.job_file` writes it to a small
content-addressed file under ``.merv/jobs/`` (its name is a digest of its content) and the rule passes the path as a
param. A change to the content changes the path, so Snakemake reruns the job; an unchanged config names the same
file, so nothing reruns.

Seeds are a dimension of the DAG: a model runs under each seed of :meth:`Workflow.seeds` (``report.seeds`` for the
models the report shows, the preset's own seed alone otherwise), in ``results/<model>/seed-<s>/``. The seed moves
the training seed (the trainable parts' initialisation and the data order) and nothing else: the data, the frozen
weights and the feature caches are shared by every seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile
from pathlib import Path

from merv.config import RunConfig, fingerprint, parse_config
from merv.pipeline import (
    REPORT_DIR,
    check_stage_data,
    model_run,
    pretrained_encoders,
    report_models,
    report_outputs,
    selected_models,
    shard_set,
    weights_inputs,
    weights_kind,
    weights_marker,
)
from merv.pretrain.config import PRETRAINED_DIR, pretrain_config_from_dict
from merv.settings import ComputeSection, ReportSection

JOBS_DIR = ".merv/jobs"
SCHEMA = "workflow/schemas/config.schema.yaml"  # in the project folder (the working directory, or merv's checkout)
SYNTH_BENCHMARKS = ("synth_mcq", "synth_open")


def write_job_file(kind: str, payload: dict, root: str | Path = ".") -> str:
    """``.merv/jobs/<kind>-<digest>.json`` holding ``payload`` (sorted JSON), written once and atomically; the path
    (relative to ``root``) is returned. The same payload always names the same file, so calling this again (a cluster
    job's own Snakemake plans the job again) writes nothing."""
    text = json.dumps(payload, sort_keys=True, indent=1) + "\n"
    rel = f"{JOBS_DIR}/{kind}-{fingerprint(payload)[:16]}.json"
    path = Path(root) / rel
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return rel


def load_pipeline_config(paths: list[str | Path]) -> dict:
    """The pipeline config as Snakemake sees it: the files merged in order (later ones patch earlier ones, as
    ``snakemake --configfile`` does), validated against the schema with its defaults filled in."""
    import yaml

    from merv.config import deep_merge

    try:  # Snakemake's own validation: the defaults it fills in are the ones the rules see
        from snakemake.utils import validate
    except ImportError:
        raise ImportError("the pipeline config needs Snakemake: pip install '.[pipeline]'") from None

    config: dict = {}
    for path in paths:
        config = deep_merge(config, yaml.safe_load(Path(path).read_text()) or {})
    schemas = [Path(SCHEMA), Path(__file__).resolve().parent.parent / SCHEMA]
    schema = next((p for p in schemas if p.is_file()), None)
    if schema is None:
        raise ValueError(f"no {SCHEMA} in this folder or beside merv: run this from the project folder")
    validate(config, str(schema), set_default=True)
    return config


class Workflow:
    """The pipeline's DAG seen from the config: built once per Snakemake run (a config error stops it before any
    job runs). Methods take wildcard values as plain strings and return paths, lists of paths and options."""

    def __init__(self, config: dict, root: str | Path = "."):
        self.config = config
        self.root = Path(root)
        self.selected = selected_models(config)
        self.runs: dict[str, RunConfig] = {name: model_run(config, name) for name in config["models"]}
        self.shard_sets = {name: shard_set(config, name, run) for name, run in self.runs.items()}
        for name, run in self.runs.items():
            check_stage_data(config, name, run)
        self.compute = parse_config(ComputeSection, config.get("compute") or {}, "compute")
        self.reported = report_models(config)
        report = config.get("report") or {}
        self.report_seeds = tuple(report.get("seeds", ReportSection.seeds))
        if not self.report_seeds or len(set(self.report_seeds)) != len(self.report_seeds):
            raise ValueError(f"report.seeds must list distinct seeds, got {list(self.report_seeds)}")
        self.feature_caches = {
            (m, self.cache_name(m, stage.data, e)): {"split": stage.data, "encoder": e}
            for m, run in self.runs.items()
            for stage in run.train.stages
            for e in run.train.cached_encoders(run.model)
        }

    def job_file(self, kind: str, payload: dict) -> str:
        return write_job_file(kind, payload, self.root)

    # ---------------------------------------------------------------------------------------------------------
    # Compute

    @property
    def threads(self) -> int:
        """The cores a computing job reserves: the threads it computes with (so jobs side by side never
        oversubscribe the machine; Snakemake lowers a reservation to --cores, which leaves the job's threads as
        they are)."""
        return self.compute.threads

    @property
    def compute_flags(self) -> str:
        """`merv` options that fix a job's float results: threads and CPU code path (a param: changing one reruns)."""
        return f"--threads {self.compute.threads} --isa {self.compute.isa}"

    # ---------------------------------------------------------------------------------------------------------
    # Seeds and result paths

    def seeds(self, model: str) -> tuple[int, ...]:
        """The seeds a model runs under: ``report.seeds`` for a reported model, seed 0 (the preset's own) else."""
        return self.report_seeds if model in self.reported else (0,)

    def run_dir(self, model: str, seed: int | str) -> str:
        return f"results/{model}/seed-{seed}"

    def seed_run(self, model: str, seed: int | str) -> RunConfig:
        """The model's run config under a seed: the preset's training seed moved by ``seed`` (seed 0: unchanged)."""
        run = self.runs[model]
        if int(seed) not in self.seeds(model):
            raise ValueError(f"model {model!r} runs under seeds {list(self.seeds(model))}, not {seed}")
        train = dataclasses.replace(run.train, seed=run.train.seed + int(seed))
        return dataclasses.replace(run, train=train)

    def stage_names(self, model: str) -> list[str]:
        return [s.name for s in self.runs[model].train.stages]

    def checkpoint(self, model: str, seed: int | str, stage: str) -> str:
        return f"{self.run_dir(model, seed)}/train/{stage}"

    def final_checkpoint(self, model: str, seed: int | str) -> str:
        return self.checkpoint(model, seed, self.stage_names(model)[-1])

    def previous_stage(self, model: str, stage: str) -> str | None:
        names = self.stage_names(model)
        if stage not in names:
            raise ValueError(f"model {model!r} has no stage {stage!r}; its stages are {names}")
        i = names.index(stage)
        return names[i - 1] if i else None

    def seed_results(self, model: str) -> list[str]:
        """Every seed's eval.json of a model (what ``results/<model>/eval.json`` summarises)."""
        return [f"{self.run_dir(model, s)}/eval.json" for s in self.seeds(model)]

    # ---------------------------------------------------------------------------------------------------------
    # Data

    def shard_settings(self, shardset: str) -> dict:
        """The frame counts, frame size and options of a shard set (``shards.sets`` in the config)."""
        shards = self.config["shards"]
        chosen = shards["sets"][shardset]
        return {
            "frames": " ".join(str(c) for c in sorted(chosen["frames"])),
            "size": chosen["size"],
            "options": f"--shard-size {shards['target_size']} --frame-format {shards['frame_format']}"
            f" --backend {shards['backend']}"
            + (" --strict" if shards["strict"] else " --no-strict")
            # only when on: the options (a param) of shards made before the option existed stay as they were
            + (" --scale-in-decoder" if shards.get("scale_in_decoder") else ""),
        }

    def train_split(self, split: str) -> dict:
        return self.config["data"]["train"][split]

    def train_root(self, split: str) -> str:
        """The folder a training JSON's media paths are relative to: its ``root``, else the JSON's folder."""
        entry = self.train_split(split)
        return entry.get("root") or str(Path(entry["json"]).parent)

    def train_shards(self, model: str, split: str) -> str:
        """Shard folder of a training split, in the shard set that the model reads."""
        return f"data/shards/{self.shard_sets[model]}/train/{split}"

    def benchmark_dir(self, bench: str) -> str:
        return self.config["data"]["benchmarks"][bench]

    def benchmark_shards(self, model: str, bench: str) -> str:
        return f"data/shards/{self.shard_sets[model]}/eval/{bench}"

    def part_dirs(self, shardset: str, split: str, parts: list[str]) -> list[str]:
        return [f"data/shards/{shardset}/parts/train/{split}/{p}" for p in parts]

    def all_shards(self) -> list[str]:
        """Every shard folder the selected models read (what DVC's ``shards`` stage makes)."""
        train = {self.train_shards(m, s.data) for m in self.selected for s in self.runs[m].train.stages}
        evals = {self.benchmark_shards(m, b) for m in self.selected for b in self.config["data"]["benchmarks"]}
        return sorted(train | evals)

    @staticmethod
    def synth_outputs() -> list[str]:
        return ["data/synth/train/align.json", "data/synth/train/finetune.json"] + [
            f"data/synth/eval_data/{b}/{f}" for b in SYNTH_BENCHMARKS for f in ("test_q.json", "test_a.json")
        ]

    # ---------------------------------------------------------------------------------------------------------
    # Weights and pretraining

    def weights_inputs(self, model: str) -> list[str]:
        """A model's weights: its built folder or the record of fetched weights, and its pretrained encoders."""
        return weights_inputs(self.config, model)

    def skip_encoder_flags(self, model: str) -> str:
        """build-tiny leaves out the encoders that come from the pretrain stage."""
        return " ".join(f"--skip-encoder {e}" for e in pretrained_encoders(self.config, model))

    def build_kind(self, model: str) -> str:
        kind = weights_kind(self.config, model)
        if kind == "fetch":
            raise ValueError(f"model {model!r} fetches its weights (weights: fetch); nothing to build")
        return kind

    def weights_job(self, model: str) -> str:
        """Only what the weights depend on (encoders, LLM): editing a stage or the projector keeps them."""
        spec = self.runs[model].to_dict()["model"]
        weights = {k: spec[k] for k in ("name", "encoders", "llm")}
        # a valid model whatever the projector and fusion (they are not built from these weights)
        weights["fusion"] = {"kind": "single" if len(spec["encoders"]) == 1 else "cross_attention"}
        weights["projector"] = {"temporal_tokens": 1, "tokens_per_frame": 1}
        return self.job_file("weights", {"model": weights})

    def pretrain_job(self, name: str) -> str:
        return self.job_file("pretrain", self.config["pretrain"][name])

    def pretrain_architecture(self, name: str) -> str:
        """A digest of the architecture a pretrain entry trains, as its preset resolves it (a param the command does
        not read: editing the preset reruns the stage)."""
        entry = self.config["pretrain"][name]
        return fingerprint(dataclasses.asdict(pretrain_config_from_dict(entry, f"pretrain.{name}").encoder_config()))

    def probe_job(self) -> str:
        return self.job_file("probe", self.config.get("pretrain") or {})

    # ---------------------------------------------------------------------------------------------------------
    # Feature caches: data/features/<model>/<split>-<encoder>-<key>. The key is what determines the cache and is
    # known before anything runs: the encoder's config, the pooling when pooled, the stored dtype, the split and how
    # it is sharded, except the frame counts of other encoders, so another encoder's frame count never touches a
    # cache. Whether the shards still hold the cached frames is checked by content when training opens the cache.

    def cache_name(self, model: str, split: str, encoder_id: str) -> str:
        run = self.runs[model]
        encoder = next(e for e in run.model.encoders if e.id == encoder_id)
        # what makes the frames (scale_in_decoder only when on: caches named before the option keep their names)
        shards = {
            k: v
            for k, v in self.config["shards"].items()
            if k in ("frame_format", "backend") or (k == "scale_in_decoder" and v)
        }
        entry = self.config["data"]["train"][split]
        shard_set_name = self.shard_sets[model]
        key = {
            "encoder": dataclasses.asdict(encoder),
            "pooling": dataclasses.asdict(run.model.projector) if run.model.projector.parameter_free else None,
            "dtype": run.train.feature_dtype,
            "split": entry,
            "synth": self.config["synth"] if entry["json"].startswith("data/synth/") else None,
            "shards": {**shards, "set": shard_set_name, "size": self.config["shards"]["sets"][shard_set_name]["size"]},
        }
        return f"{split}-{encoder_id}-{fingerprint(key)[:12]}"

    def feature_cache(self, model: str, cache: str) -> dict:
        try:
            return self.feature_caches[model, cache]
        except KeyError:
            raise ValueError(f"model {model!r} caches no features as {cache!r}") from None

    def stage_features(self, model: str, stage: str) -> dict[str, str]:
        """``{encoder: cache folder}`` of a training stage (empty when its model runs its encoders on the fly)."""
        run = self.runs[model]
        split = run.train.stage(stage).data
        return {
            e: f"data/features/{model}/{self.cache_name(model, split, e)}" for e in run.train.cached_encoders(run.model)
        }

    def feature_weights(self, model: str, cache: str) -> list[tuple[str, bool]]:
        """``(path, ancient)`` of each weight input a feature extraction loads. A pretrained encoder's own folder
        counts by time: retraining it changes its features, which its cache's name does not show. The others are
        ancient: built weights are a function of the encoder's config, which names the cache (rebuilding them for
        the LLM's sake keeps the features), and the cache key holds every encoder's weight digest, checked when
        training opens the cache."""
        encoder = self.feature_cache(model, cache)["encoder"]
        own = pretrained_encoders(self.config, model).get(encoder)
        own = f"{PRETRAINED_DIR}/{own}" if own else None
        return [(p, p != own) for p in self.weights_inputs(model)]

    def feature_part(self, model: str, cache: str, part: str) -> dict:
        """A cache's part (rule extract_feature_part): the shard folder of that part of the cache's split, which
        holds the very tars the gathered split links, and the part cache made from it."""
        split = self.feature_cache(model, cache)["split"]
        return {
            "shards": self.part_dirs(self.shard_sets[model], split, [part])[0],
            "out": f"data/features/{model}/parts/{cache}/{part}",
        }

    def feature_part_dirs(self, model: str, cache: str, parts: list[str]) -> list[str]:
        """The part caches of a cache, in the order of its split's parts (what gather_features joins)."""
        return [self.feature_part(model, cache, p)["out"] for p in parts]

    def features_job(self, model: str) -> str:
        """Only the model: a change to a training stage does not touch the features."""
        return self.job_file("features", {"model": self.runs[model].to_dict()["model"]})

    # ---------------------------------------------------------------------------------------------------------
    # Training

    def stage_inputs(self, model: str, seed: str, stage: str) -> dict:
        data = self.runs[model].train.stage(stage).data
        inputs = {
            "data": self.train_shards(model, data),
            "weights": self.weights_inputs(model),
            "features": list(self.stage_features(model, stage).values()),
        }
        prev = self.previous_stage(model, stage)
        if prev:
            inputs["init"] = self.checkpoint(model, seed, prev)
        return inputs

    def stage_job(self, model: str, seed: str, stage: str) -> str:
        """The run config a stage trains with, reduced to that stage: editing another stage does not rerun it."""
        run = self.seed_run(model, seed).to_dict()
        run["train"]["stages"] = [s for s in run["train"]["stages"] if s["name"] == stage]
        return self.job_file("train", run)

    def train_flags(self, model: str, seed: str, stage: str) -> str:
        """The stage's inputs as `merv train` options: the previous stage's checkpoint and the feature caches."""
        flags = [f"--features {e}={path}" for e, path in self.stage_features(model, stage).items()]
        prev = self.previous_stage(model, stage)
        if prev:
            flags.insert(0, f"--init {self.checkpoint(model, seed, prev)}")
        return " ".join(flags)

    def launch_flags(self, model: str, seed: str) -> str:
        """merv train's submitit options from config ``launch`` (empty when training in the job itself)."""
        launch = self.config["launch"]
        if launch["launcher"] == "none":
            return ""
        flags = [
            f"--launcher {launch['launcher']}",
            f"--nodes {launch['nodes']}",
            f"--tasks-per-node {launch['tasks_per_node']}",
            f"--gpus-per-node {launch['gpus_per_node']}",
            f"--time {launch['time_min']}",
            f"--submitit-dir {self.run_dir(model, seed)}/submitit",
        ]
        flags += [f"--{k} {launch[k]}" for k in ("partition", "account") if launch[k]]
        return " ".join(flags)

    def train_gpus(self) -> int:
        """GPUs the Snakemake job of a stage holds: none when it only submits a Slurm job through submitit (that job
        asks for launch.gpus_per_node itself); the processes' GPUs when it trains in place (none or local)."""
        launch = self.config["launch"]
        if launch["launcher"] == "slurm":
            return 0
        return launch["gpus_per_node"] if launch["launcher"] == "local" else min(1, launch["gpus_per_node"])

    # ---------------------------------------------------------------------------------------------------------
    # Evaluation

    def eval_results(self, model: str, seed: str) -> list[str]:
        return [f"{self.run_dir(model, seed)}/eval/{b}.json" for b in self.config["data"]["benchmarks"]]

    def eval_chunks(self, model: str, seed: str, bench: str) -> list[str]:
        n = self.config["eval"]["num_chunks"]
        return [f"{self.run_dir(model, seed)}/eval/{bench}/chunk-{k}-of-{n}.json" for k in range(n)]

    def eval_options(self) -> str:
        """What the numbers depend on; changing one reruns the evaluation jobs (their answers come from the cache)."""
        cfg = self.config["eval"]
        flags = [f"--mcq {cfg['mcq']}", f"--batch-size {cfg['batch_size']}"]
        if cfg.get("limit"):
            flags.append(f"--limit {cfg['limit']}")
        if cfg["max_new_tokens"]:
            flags.append(f"--max-new-tokens {cfg['max_new_tokens']}")
        for key in ("url", "model", "preset"):
            if cfg["judge"][key]:
                flags.append(f"--judge-{key} {shlex.quote(str(cfg['judge'][key]))}")
        return " ".join(flags)

    def judge_access_flags(self) -> str:
        """How the judge is reached, not what it answers: a resource, so changing it reruns nothing."""
        judge = self.config["eval"]["judge"]
        flags = [
            f"--judge-api-key-env {shlex.quote(judge['api_key_env'])}",
            f"--judge-concurrency {judge['concurrency']}",
            f"--judge-timeout {judge['timeout_s']}",
            f"--judge-max-attempts {judge['max_attempts']}",
        ]
        if judge["api_key_file"]:
            flags.append(f"--judge-api-key-file {shlex.quote(judge['api_key_file'])}")
        return " ".join(flags)

    # ---------------------------------------------------------------------------------------------------------
    # Report: the tables and figures across the models config `report` names, each under every report seed.

    def report_outputs(self) -> list[str]:
        return report_outputs(self.config) if self.reported else []

    def report_benchmark_shards(self, bench: str) -> str | None:
        """A benchmark's shards in the shard set of the fusion-weight model (the one model the report runs)."""
        model = (self.config["report"].get("fusion_weights") or {}).get("model") or (self.reported or [None])[0]
        return self.benchmark_shards(model, bench) if model else None

    def report_inputs(self) -> dict:
        """Each reported model's per-seed eval.json and final checkpoint, the frozen weights it loads (costs and
        fusion weights run the models), the benchmarks' questions (question types) and the shards the fusion-weight
        figure runs on."""
        runs = [(m, s) for m in self.reported for s in self.seeds(m)]
        inputs = {
            "results": [f"{self.run_dir(m, s)}/eval.json" for m, s in runs],
            "rows": [r for m, s in runs for r in self.eval_results(m, s)],
            "checkpoints": [self.final_checkpoint(m, s) for m, s in runs],
            "weights": sorted({p for m in self.reported for p in self.weights_inputs(m)}),
            "questions": [f"{d}/test_q.json" for d in self.config["data"]["benchmarks"].values()],
        }
        figure = self.config["report"].get("fusion_weights")
        if figure:
            inputs["shards"] = self.report_benchmark_shards(figure["benchmark"])
        return inputs

    def report_job(self) -> str:
        """merv report's spec: models with each seed's results and checkpoint, benchmarks, and the tables' rows."""
        tables = self.config["report"]
        weights = tables.get("fusion_weights") or {}
        spec = {
            "models": [
                {
                    "name": m,
                    "runs": [
                        {
                            "seed": s,
                            "results": f"{self.run_dir(m, s)}/eval.json",
                            "checkpoint": self.final_checkpoint(m, s),
                        }
                        for s in self.seeds(m)
                    ],
                }
                for m in self.reported
            ],
            "benchmarks": [
                {"name": b, "data": d, "shards": self.report_benchmark_shards(b)}
                for b, d in self.config["data"]["benchmarks"].items()
            ],
            "main": tables.get("main", []),
            "fusion_ablation": tables.get("fusion_ablation", []),
            "fusion_weights_model": weights.get("model"),
            "fusion_weights_benchmark": weights.get("benchmark"),
        }
        return self.job_file("report", spec)

    # ---------------------------------------------------------------------------------------------------------
    # DVC: dvc.yaml is generated from the config (`merv dvc-yaml`; tests check the committed file is current)

    def dvc_yaml(self) -> str:
        """``dvc.yaml`` for this config: the data stages (``synth``, ``shards``), one ``models`` stage that trains and
        evaluates every model of ``pipeline.models`` under each of its seeds (the pretrained encoders they load
        included) and the tables of ``report``. Every stage runs Snakemake, the one place that knows how to build
        things; DVC caches and pushes the outputs and tracks the params and metrics.

        The models share one stage because DVC runs its stages one at a time: a stage per model would leave cores
        idle whenever a model has fewer jobs ready than there are cores (3 seeds on 2 cores, an encoder pretraining
        alone), while one Snakemake run keeps every core busy across models. DVC still names the params that
        changed (``dvc status``), and Snakemake reruns only the outdated jobs of the stage."""
        import yaml

        stages = {
            "synth": {
                "cmd": "snakemake -- data/synth/summary.json",
                "params": [{"config/config.yaml": ["synth"]}],
                "outs": [{"data/synth": {"persist": True}}],
            },
            "shards": {
                # a target rule, not --until: Snakemake leaves out the part jobs a plan checkpoint creates
                "cmd": "snakemake all_shards",
                "deps": ["data/synth"],
                "params": [{"config/config.yaml": ["data", "shards", "pipeline"]}],
                "outs": [{"data/media": {"persist": True}}, {"data/shards": {"persist": True}}],
            },
        }
        if self.selected:
            stages["models"] = self._dvc_models()
        if self.reported:
            stages["tables"] = self._dvc_tables()
        header = (
            "# GENERATED by `merv dvc-yaml` from config/config.yaml: edit the config, then rerun it (a test checks\n"
            "# that this file is current). DVC view of the pipeline: every stage runs Snakemake; DVC caches and\n"
            "# pushes the outputs and tracks params and metrics. DVC and Snakemake agree on what is out of date:\n"
            "# a stage's params are the config sections its jobs read, its deps the outputs of earlier stages, and\n"
            "# its outputs persist, so a rerun stage only redoes the jobs Snakemake finds outdated. Like Snakemake,\n"
            "# DVC does not rerun a stage when only Python code changed: `dvc repro -f STAGE` does.\n"
        )
        return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)

    def _dvc_models(self) -> dict:
        """The models stage: every pretrained encoder of ``pretrain`` and every selected model's weights, feature
        caches, training stages and evaluations, under each of its seeds, in one Snakemake run."""
        pretrained = [f"{PRETRAINED_DIR}/{name}" for name in sorted(self.config.get("pretrain") or {})]
        runs = [(m, s) for m in self.selected for s in self.seeds(m)]
        params = ["pretrain"] * bool(pretrained) + [f"models.{m}" for m in self.selected] + ["compute", "eval"]
        if any(m in self.reported for m in self.selected):
            params.append("report.seeds")
        outs = [PRETRAINED_DIR] * bool(pretrained)
        outs += [p for m in self.selected for p in (f"data/weights/{m}", f"data/features/{m}")]
        outs += [f"{self.run_dir(m, s)}/{d}" for m, s in runs for d in ("train", "eval")]
        return {
            "cmd": "snakemake -- " + " ".join(pretrained + [f"results/{m}/eval.json" for m in self.selected]),
            "deps": ["data/shards", "merv/presets"],
            "params": [{"config/config.yaml": params}],
            "outs": [{p: {"persist": True}} for p in outs],
            "metrics": [f"results/{m}/eval.json" for m in self.selected]
            + [f"{self.run_dir(m, s)}/eval.json" for m, s in runs],
        }

    def _dvc_tables(self) -> dict:
        """The tables stage: each reported model's eval.json, every seed's checkpoints and eval rows, its weights
        (the report runs the models), the pretrained encoders, shards and data (question types)."""
        runs = [(m, s) for m in self.reported for s in self.seeds(m)]
        deps = (
            [f"results/{m}/eval.json" for m in self.reported]
            + [f"{self.run_dir(m, s)}/{d}" for m, s in runs for d in ("train", "eval")]
            + [f"data/weights/{m}" for m in self.reported]
            + [PRETRAINED_DIR, "data/shards", "data/synth"]
        )
        outs = self.report_outputs()
        plots = {
            f"{REPORT_DIR}/by_type.csv": {"template": "bar_horizontal", "x": "value", "y": "question_type"},
            f"{REPORT_DIR}/fusion_weights.csv": {"template": "bar_horizontal", "x": "mean", "y": "question_type"},
        }
        plotted = [p for p in outs if p in plots or p.endswith(".png")]
        return {
            "cmd": f"snakemake -- {REPORT_DIR}/metrics.json",
            "deps": deps,
            "params": [{"config/config.yaml": ["report", "compute"]}],
            "outs": [p for p in outs if p not in plotted and not p.endswith("metrics.json")],
            "metrics": [p for p in outs if p.endswith("metrics.json")],
            "plots": [{p: plots[p]} if p in plots else p for p in plotted],
        }

    # ---------------------------------------------------------------------------------------------------------
    # merv status

    def model_status(self, model: str) -> dict:
        """What the filesystem holds of a model: weights in place, each stage's trained seeds, benchmarks scored."""
        stages = {}
        for stage in self.stage_names(model):
            metas = [self.root / self.checkpoint(model, s, stage) / "meta.json" for s in self.seeds(model)]
            stages[stage] = sum(m.is_file() for m in metas)
        eval_file = self.root / "results" / model / "eval.json"
        scores = json.loads(eval_file.read_text())["benchmarks"] if eval_file.is_file() else {}
        return {
            "model": model,
            "preset": self.config["models"][model]["preset"],
            "selected": model in self.selected,
            "weights": weights_kind(self.config, model),
            "weights_ready": (self.root / weights_marker(self.config, model)).exists(),
            "seeds": list(self.seeds(model)),
            "stages": stages,
            "eval": {b: scores[b]["value"] for b in scores},
        }


def status_table(rows: list[dict]) -> str:
    """A Markdown table of :meth:`Workflow.model_status` rows (one per model)."""
    lines = ["| model | preset | default | weights | trained (seeds) | evaluated |", "|---|---|---|---|---|---|"]
    for r in rows:
        weights = f"{r['weights']} ({'ready' if r['weights_ready'] else 'missing'})"
        trained = ", ".join(f"{s} {done}/{len(r['seeds'])}" for s, done in r["stages"].items())
        evaluated = ", ".join(f"{b} {v:.3f}" for b, v in r["eval"].items() if v is not None) or "-"
        default = "yes" if r["selected"] else "no"
        lines.append(f"| {r['model']} | {r['preset']} | {default} | {weights} | {trained} | {evaluated} |")
    return "\n".join(lines)
