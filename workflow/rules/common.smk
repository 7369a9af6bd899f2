# Input functions and config resolution shared by the rules. No rules here.
import dataclasses
import json
import shlex
from pathlib import Path

from merv.pipeline import (
    check_stage_data,
    model_run,
    pretrained_encoders,
    report_models,
    report_outputs,
    selected_models,
    shard_set,
    weights_inputs,
    weights_kind,
)
from merv.config import parse_config
from merv.settings import ComputeSection
from merv.pretrain.config import PRETRAINED_DIR

MERV_ENV = "../../envs/merv.yaml"

# Resolve every configured model once at parse time, so a config error stops the DAG before any job runs.
SELECTED = selected_models(config)
RUNS = {name: model_run(config, name) for name in config["models"]}
SHARD_SETS = {name: shard_set(config, name, run) for name, run in RUNS.items()}
for _name, _run in RUNS.items():
    check_stage_data(config, _name, _run)


def refresh_media_indexes():
    """Rewrite the media index of every configured source whose media changed since it was written (see
    merv.data.media): the shard jobs (and feature extraction) that read that source then rerun. Only the main
    Snakemake process does it; a cluster job's own Snakemake plans one job and must not touch inputs."""
    from merv.data.media import refresh_index
    from merv.data.parts import refresh_part_indexes

    if not workflow.is_main_process:
        return
    for split in config["data"]["train"]:
        refresh_part_indexes(Path(f"data/media/train/{split}"))
    for bench in config["data"]["benchmarks"]:
        refresh_index(Path(f"data/media/eval/{bench}.json"))


refresh_media_indexes()


wildcard_constraints:
    model="|".join(config["models"]),
    stage="[A-Za-z0-9_]+",
    split="[A-Za-z0-9_]+",
    bench="[A-Za-z0-9_]+",
    shardset="|".join(config["shards"]["sets"]),
    part="part-[0-9]+",


# How computing jobs run their numerics (config `compute`): their threads come from here, never from the cores
# Snakemake grants a job (it exports OMP_NUM_THREADS = the job's `threads`, which `merv --threads` overrides).
COMPUTE = parse_config(ComputeSection, config.get("compute") or {}, "compute")


def compute_threads():
    """The cores a computing job reserves: the threads it computes with (so jobs side by side never oversubscribe
    the machine; Snakemake lowers a reservation to --cores, which leaves the job's own threads as they are)."""
    return COMPUTE.threads


def compute_flags():
    """`merv` options that fix a job's float results: threads and CPU code path (a param: changing one reruns)."""
    return f"--threads {COMPUTE.threads} --isa {COMPUTE.isa}"


# ---------------------------------------------------------------------------------------------------------------
# Data


def shard_settings(wildcards):
    """The frame counts, frame size and options of a shard set (`shards.sets` in the config)."""
    shards = config["shards"]
    chosen = shards["sets"][wildcards.shardset]
    return {
        "frames": " ".join(str(c) for c in sorted(chosen["frames"])),
        "size": chosen["size"],
        "options": f"--shard-size {shards['target_size']} --frame-format {shards['frame_format']}"
        f" --backend {shards['backend']}" + (" --strict" if shards["strict"] else " --no-strict"),
    }


def train_split(wildcards):
    return config["data"]["train"][wildcards.split]


def train_root(wildcards):
    """The folder a training JSON's media paths are relative to: its `root`, else the JSON's folder."""
    split = train_split(wildcards)
    return split.get("root") or str(Path(split["json"]).parent)


def train_plan(wildcards):
    """The part plan of a training split (checkpoint plan_train_parts); the parts are known once it exists."""
    return checkpoints.plan_train_parts.get(split=wildcards.split).output[0]


def train_parts(wildcards):
    """The shard folders of a training split's parts, in order (what gather_train_shards joins)."""
    from merv.data.parts import read_plan

    parts = read_plan(train_plan(wildcards))["parts"]
    return [f"data/shards/{wildcards.shardset}/parts/train/{wildcards.split}/{p}" for p in parts]


def train_part_digest(wildcards):
    """What a part's shards depend on (its samples, its media's stats): the part's job reruns when it changes."""
    from merv.data.parts import part_digest

    return part_digest(train_plan(wildcards), wildcards.part)


def benchmark_dir(wildcards):
    return config["data"]["benchmarks"][wildcards.bench]


def train_shards(model, split):
    """Shard folder of a training split, in the shard set that the model reads."""
    return f"data/shards/{SHARD_SETS[model]}/train/{split}"


def benchmark_shards(wildcards):
    """Shard folder of a benchmark (wildcards `model`, `bench`), in the shard set that the model reads."""
    return f"data/shards/{SHARD_SETS[wildcards.model]}/eval/{wildcards.bench}"


def synth_outputs():
    return ["data/synth/train/align.json", "data/synth/train/finetune.json"] + [
        f"data/synth/eval_data/{b}/{f}" for b in ("synth_mcq", "synth_open") for f in ("test_q.json", "test_a.json")
    ]


# ---------------------------------------------------------------------------------------------------------------
# Weights


def weights_input(wildcards):
    """A model's weights: its built folder or the record of fetched weights, and its pretrained encoders."""
    return weights_inputs(config, wildcards.model)


def skip_encoder_flags(wildcards):
    """build-tiny leaves out the encoders that come from the pretrain stage."""
    return " ".join(f"--skip-encoder {e}" for e in pretrained_encoders(config, wildcards.model))


def pretrain_config_json(wildcards):
    return json.dumps(config["pretrain"][wildcards.name], sort_keys=True)


def pretrain_encoder_json(wildcards):
    """The architecture a pretrain entry trains, as its preset resolves it: editing the preset reruns the stage."""
    from merv.pretrain.config import pretrain_config_from_dict

    enc = pretrain_config_from_dict(config["pretrain"][wildcards.name]).encoder_config()
    return json.dumps(dataclasses.asdict(enc), sort_keys=True)


def build_kind(wildcards):
    kind = weights_kind(config, wildcards.model)
    if kind == "fetch":
        raise ValueError(f"model {wildcards.model!r} fetches its weights (weights: fetch); nothing to build")
    return kind


def weights_config_json(wildcards):
    """Only what the weights depend on (encoders, LLM): editing a stage or the projector keeps them."""
    model = RUNS[wildcards.model].to_dict()["model"]
    weights = {k: model[k] for k in ("name", "encoders", "llm")}
    # a valid model whatever the projector and fusion (they are not built from these weights)
    weights["fusion"] = {"kind": "single" if len(model["encoders"]) == 1 else "cross_attention"}
    weights["projector"] = {"temporal_tokens": 1, "tokens_per_frame": 1}
    return json.dumps({"model": weights}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def stage_names(model):
    return [s.name for s in RUNS[model].train.stages]


def checkpoint(model, stage):
    return f"results/{model}/train/{stage}"


def previous_stage(model, stage):
    names = stage_names(model)
    if stage not in names:
        raise ValueError(f"model {model!r} has no stage {stage!r}; its stages are {names}")
    i = names.index(stage)
    return names[i - 1] if i else None


def stage_inputs(wildcards):
    stage = RUNS[wildcards.model].train.stage(wildcards.stage)
    inputs = {"data": train_shards(wildcards.model, stage.data), "weights": weights_input(wildcards)}
    inputs["features"] = list(stage_features(wildcards).values())
    prev = previous_stage(wildcards.model, wildcards.stage)
    if prev:
        inputs["init"] = checkpoint(wildcards.model, prev)
    return inputs


def init_flag(wildcards, input):
    return f"--init {input.init}" if "init" in input.keys() else ""


def stage_config_json(wildcards):
    """The run config a stage trains with, reduced to that stage: editing another stage does not rerun this one."""
    run = RUNS[wildcards.model].to_dict()
    run["train"]["stages"] = [s for s in run["train"]["stages"] if s["name"] == wildcards.stage]
    return json.dumps(run, sort_keys=True)


def final_checkpoint(wildcards):
    return checkpoint(wildcards.model, stage_names(wildcards.model)[-1])


def eval_results(wildcards):
    return [f"results/{wildcards.model}/eval/{b}.json" for b in config["data"]["benchmarks"]]


def eval_chunks(wildcards):
    n = config["eval"]["num_chunks"]
    return [f"results/{wildcards.model}/eval/{wildcards.bench}/chunk-{k}-of-{n}.json" for k in range(n)]


def eval_options():
    """What the numbers depend on; changing one reruns the evaluation jobs (their answers come from the cache)."""
    cfg = config["eval"]
    flags = [f"--mcq {cfg['mcq']}", f"--batch-size {cfg['batch_size']}"]
    if cfg.get("limit"):
        flags.append(f"--limit {cfg['limit']}")
    if cfg["max_new_tokens"]:
        flags.append(f"--max-new-tokens {cfg['max_new_tokens']}")
    for key in ("url", "model", "preset"):
        if cfg["judge"][key]:
            flags.append(f"--judge-{key} {shlex.quote(str(cfg['judge'][key]))}")
    return " ".join(flags)


def judge_access_flags(wildcards):
    """How the judge is reached, not what it answers: a resource, so changing it reruns nothing."""
    judge = config["eval"]["judge"]
    flags = [
        f"--judge-api-key-env {shlex.quote(judge['api_key_env'])}",
        f"--judge-concurrency {judge['concurrency']}",
        f"--judge-timeout {judge['timeout_s']}",
        f"--judge-max-attempts {judge['max_attempts']}",
    ]
    if judge["api_key_file"]:
        flags.append(f"--judge-api-key-file {shlex.quote(judge['api_key_file'])}")
    return " ".join(flags)


def launch_flags(wildcards, attempt=1):
    """merv train's submitit flags from config `launch` (a shell fragment; empty when training in the job)."""
    launch = config["launch"]
    if launch["launcher"] == "none":
        return ""
    flags = [
        f"--launcher {launch['launcher']}",
        f"--nodes {launch['nodes']}",
        f"--tasks-per-node {launch['tasks_per_node']}",
        f"--gpus-per-node {launch['gpus_per_node']}",
        f"--time {launch['time_min']}",
        f"--submitit-dir results/{wildcards.model}/submitit",
    ]
    flags += [f"--{k} {launch[k]}" for k in ("partition", "account") if launch[k]]
    return " ".join(flags)


def train_gpus(wildcards, attempt=1):
    """GPUs the Snakemake job of a stage holds: none when it only submits a Slurm job through submitit (that job
    asks for launch.gpus_per_node itself); the processes' GPUs when it trains in place (launcher none or local)."""
    launch = config["launch"]
    if launch["launcher"] == "slurm":
        return 0
    per_process = 1 if launch["gpus_per_node"] else 0
    return launch["gpus_per_node"] if launch["launcher"] == "local" else per_process


# ---------------------------------------------------------------------------------------------------------------
# Feature caches (features.smk): data/features/<model>/<split>-<encoder>-<key>. The key is what determines the
# cache and is known before anything runs: the encoder's config, the pooling when pooled, the stored dtype, the split
# and how it is sharded, except the frame counts of other encoders, so another encoder's frame count never touches a
# cache. Whether the shards still hold the cached frames is checked by content when training opens the cache.


def cache_name(model, split, encoder_id):
    from merv.config import fingerprint

    run = RUNS[model]
    encoder = next(e for e in run.model.encoders if e.id == encoder_id)
    shards = {k: v for k, v in config["shards"].items() if k in ("frame_format", "backend")}
    key = {
        "encoder": dataclasses.asdict(encoder),
        "pooling": dataclasses.asdict(run.model.projector) if run.model.projector.parameter_free else None,
        "dtype": run.train.feature_dtype,
        "split": config["data"]["train"][split],
        "synth": config["synth"] if config["data"]["train"][split]["json"].startswith("data/synth/") else None,
        "shards": {**shards, "set": SHARD_SETS[model], "size": config["shards"]["sets"][SHARD_SETS[model]]["size"]},
    }
    return f"{split}-{encoder_id}-{fingerprint(key)[:12]}"


FEATURE_CACHES = {
    (m, cache_name(m, stage.data, e)): {"split": stage.data, "encoder": e}
    for m, run in RUNS.items()
    for stage in run.train.stages
    for e in run.train.cached_encoders(run.model)
}


def feature_cache(wildcards):
    try:
        return FEATURE_CACHES[wildcards.model, wildcards.cache]
    except KeyError:
        raise ValueError(f"model {wildcards.model!r} caches no features as {wildcards.cache!r}") from None


def stage_features(wildcards):
    """``{encoder: cache folder}`` of a training stage (empty when its model runs its encoders on the fly)."""
    run = RUNS[wildcards.model]
    split = run.train.stage(wildcards.stage).data
    return {
        e: f"data/features/{wildcards.model}/{cache_name(wildcards.model, split, e)}"
        for e in run.train.cached_encoders(run.model)
    }


def feature_weights(wildcards):
    """The weights a feature extraction loads. A pretrained encoder's own folder counts by time: retraining it changes
    its features, which its cache's name does not show. The others are ancient: built weights are a function of the
    encoder's config, which names the cache (rebuilding them for the LLM's sake keeps the features), and the cache
    key holds every encoder's weight digest, checked when training opens the cache."""
    from merv.pretrain.config import PRETRAINED_DIR

    encoder = feature_cache(wildcards)["encoder"]
    own = pretrained_encoders(config, wildcards.model).get(encoder)
    own = f"{PRETRAINED_DIR}/{own}" if own else None
    return [p if p == own else ancient(p) for p in weights_inputs(config, wildcards.model)]


def features_flags(wildcards):
    return " ".join(f"--features {e}={path}" for e, path in stage_features(wildcards).items())


# ---------------------------------------------------------------------------------------------------------------
# Report (report.smk): the tables and figures across the models config `report` names.

REPORTED = report_models(config)


def report_benchmark_shards(bench):
    """A benchmark's shards in the shard set of the fusion-weight model (the one model the report runs)."""
    model = (config["report"].get("fusion_weights") or {}).get("model") or (REPORTED or [None])[0]
    return f"data/shards/{SHARD_SETS[model]}/eval/{bench}" if model else None


def report_inputs(wildcards):
    """Each reported model's eval.json, final checkpoint and the frozen weights it loads (costs and fusion weights
    run the models), the benchmarks' questions (question types) and the shards the fusion-weight figure runs on."""
    inputs = {
        "results": [f"results/{m}/eval.json" for m in REPORTED],
        "checkpoints": [checkpoint(m, stage_names(m)[-1]) for m in REPORTED],
        "weights": sorted({p for m in REPORTED for p in weights_inputs(config, m)}),
        "questions": [f"{d}/test_q.json" for d in config["data"]["benchmarks"].values()],
    }
    if config["report"].get("fusion_weights"):
        inputs["shards"] = report_benchmark_shards(config["report"]["fusion_weights"]["benchmark"])
    return inputs


def report_spec_json(wildcards):
    """merv report's spec: models with their results and checkpoints, benchmarks, and what each table shows."""
    tables = config["report"]
    weights = tables.get("fusion_weights") or {}
    spec = {
        "models": [
            {"name": m, "results": f"results/{m}/eval.json", "checkpoint": checkpoint(m, stage_names(m)[-1])}
            for m in REPORTED
        ],
        "benchmarks": [
            {"name": b, "data": d, "shards": report_benchmark_shards(b)} for b, d in config["data"]["benchmarks"].items()
        ],
        "main": tables["main"],
        "fusion_ablation": tables["fusion_ablation"],
        "fusion_weights_model": weights.get("model"),
        "fusion_weights_benchmark": weights.get("benchmark"),
    }
    return json.dumps(spec, sort_keys=True)
