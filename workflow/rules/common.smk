# Input functions and config resolution shared by the rules. No rules here.
import dataclasses
import json

from merv.config import resolve_run_config
from merv.data.transforms import frame_size

MERV_ENV = "../../envs/merv.yaml"


def run_config(model):
    """The typed run config of a model entry (preset + overrides); raises a clear ValueError on bad config."""
    entry = config["models"][model]
    return resolve_run_config(entry["preset"], entry.get("overrides") or {})


# Resolve every model once at parse time, so a config error stops the DAG before any job runs.
RUNS = {name: run_config(name) for name in config["models"]}
for _name, _run in RUNS.items():
    for _stage in _run.train.stages:
        if _stage.data not in config["data"]["train"]:
            raise ValueError(
                f"model {_name!r} stage {_stage.name!r} trains on data {_stage.data!r}, "
                f"which config data.train does not define (it has {sorted(config['data']['train'])})"
            )


def shard_settings():
    """Frame counts and frame size that cover every encoder of every configured model."""
    encoders = [e for run in RUNS.values() for e in run.model.encoders]
    shards = config["shards"]
    return {
        "frames": " ".join(str(c) for c in sorted({e.num_frames for e in encoders})),
        "size": frame_size(encoders, read_weights=False),  # the short side every encoder's own resize needs
        "options": f"--shard-size {shards['target_size']} --frame-format {shards['frame_format']}"
        f" --backend {shards['backend']}" + (" --strict" if shards["strict"] else ""),
    }


def train_split(wildcards):
    return config["data"]["train"][wildcards.split]


def benchmark_dir(wildcards):
    return config["data"]["benchmarks"][wildcards.bench]


def synth_outputs():
    return ["data/synth/train/align.json", "data/synth/train/finetune.json"] + [
        f"data/synth/eval_data/{b}/test_q.json" for b in ("synth_mcq", "synth_open")
    ]


def weights_manifest(model):
    """The marker of locally built tiny weights, or nothing when the model uses existing weights."""
    if config["models"][model].get("build_tiny_weights"):
        return [f"data/weights/{model}.json"]
    return []


def stage_names(model):
    return [s.name for s in RUNS[model].train.stages]


def previous_stage(model, stage):
    names = stage_names(model)
    if stage not in names:
        raise ValueError(f"model {model!r} has no stage {stage!r}; its stages are {names}")
    i = names.index(stage)
    return names[i - 1] if i else None


def stage_inputs(wildcards):
    stage = RUNS[wildcards.model].train.stage(wildcards.stage)
    inputs = {"data": f"data/shards/train/{stage.data}", "weights": weights_manifest(wildcards.model)}
    inputs["features"] = list(stage_features(wildcards).values())
    prev = previous_stage(wildcards.model, wildcards.stage)
    if prev:
        inputs["init"] = f"results/{wildcards.model}/{prev}"
    return inputs


def init_flag(wildcards, input):
    return f"--init {input.init}" if "init" in input.keys() else ""


def stage_config_json(wildcards):
    """The run config a stage trains with, reduced to that stage: editing another stage does not rerun this one."""
    run = RUNS[wildcards.model].to_dict()
    run["train"]["stages"] = [s for s in run["train"]["stages"] if s["name"] == wildcards.stage]
    return json.dumps(run, sort_keys=True)


def final_checkpoint(wildcards):
    return f"results/{wildcards.model}/{stage_names(wildcards.model)[-1]}"


def eval_results(wildcards):
    return [f"results/{wildcards.model}/eval/{b}.json" for b in config["data"]["benchmarks"]]


def tiny_config_json(wildcards):
    """Only what the built weights depend on (encoders, LLM): editing a stage or the projector keeps them."""
    model = RUNS[wildcards.model].to_dict()["model"]
    return json.dumps({"model": {k: model[k] for k in ("name", "encoders", "llm")}}, sort_keys=True)


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


# ---------------------------------------------------------------------------------------------------------------
# Feature caches (features.smk). A cache is named by what determines it and is known before anything runs: the
# encoder's config, the pooling when pooled, the stored dtype, the split and how it is sharded, except the frame
# counts of other encoders. Models sharing an encoder share its cache; another encoder's frame count never touches
# it. Whether the shards still hold the cached frames is checked by content when training opens the cache.


def cache_name(model, split, encoder_id):
    from merv.config import fingerprint
    from merv.features.cache import POOLED

    run = RUNS[model]
    encoder = next(e for e in run.model.encoders if e.id == encoder_id)
    shards = {k: v for k, v in config["shards"].items() if k not in ("workers", "strict", "target_size")}
    key = {
        "encoder": dataclasses.asdict(encoder),
        "pooling": dataclasses.asdict(run.model.projector) if run.model.projector.pooling in POOLED else None,
        "dtype": run.train.feature_dtype,
        "split": config["data"]["train"][split],
        "synth": config["synth"] if config["data"]["train"][split]["json"].startswith("data/synth/") else None,
        "shards": {**shards, "size": shard_settings()["size"]},
    }
    return f"{split}-{encoder_id}-{fingerprint(key)[:12]}"


FEATURE_CACHES = {
    cache_name(m, stage.data, e): {"model": m, "split": stage.data, "encoder": e}
    for m, run in RUNS.items()
    for stage in run.train.stages
    for e in run.train.cached_encoders(run.model)
}


def feature_cache(wildcards):
    try:
        return FEATURE_CACHES[wildcards.cache]
    except KeyError:
        raise ValueError(f"no configured model caches features as {wildcards.cache!r}") from None


def stage_features(wildcards):
    """``{encoder: cache folder}`` of a training stage (empty when its model runs its encoders on the fly)."""
    run = RUNS[wildcards.model]
    split = run.train.stage(wildcards.stage).data
    return {e: f"data/features/{cache_name(wildcards.model, split, e)}" for e in run.train.cached_encoders(run.model)}


def features_flags(wildcards):
    return " ".join(f"--features {e}={path}" for e, path in stage_features(wildcards).items())
