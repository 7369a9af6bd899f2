# Input functions and config resolution shared by the rules. No rules here.
import json
import shlex

from merv.config import resolve_run_config

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
        "size": max(e.image_size for e in encoders),
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


def eval_chunks(wildcards):
    n = config["eval"]["num_chunks"]
    return [f"results/{wildcards.model}/eval/{wildcards.bench}/chunk-{k}-of-{n}.json" for k in range(n)]


def eval_options():
    """What the numbers depend on; changing one reruns the evaluation jobs (their answers come from the cache)."""
    cfg = config["eval"]
    flags = [f"--mcq {cfg['mcq']}", f"--batch-size {cfg['batch_size']}"]
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
