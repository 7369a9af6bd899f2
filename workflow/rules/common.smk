# What Snakemake must see: the workflow's view of the config (merv.workflow: every path, input, job file and option,
# tested in tests/test_workflow.py), the wildcard constraints and what needs Snakemake's own objects (checkpoints,
# ancient). No rules here.
from pathlib import Path

from merv.pretrain.config import PRETRAINED_DIR
from merv.workflow import Workflow

MERV_ENV = "../../envs/merv.yaml"

# Resolve every configured model once at parse time, so a config error stops the DAG before any job runs.
W = Workflow(config)


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
    seed="[0-9]+",
    stage="[A-Za-z0-9_]+",
    split="[A-Za-z0-9_]+",
    bench="[A-Za-z0-9_]+",
    shardset="|".join(config["shards"]["sets"]),
    part="part-[0-9]+",


def train_plan(wildcards):
    """The part plan of a training split (checkpoint plan_train_parts); the parts are known once it exists."""
    return checkpoints.plan_train_parts.get(split=wildcards.split).output[0]


def train_parts(wildcards):
    """The shard folders of a training split's parts, in order (what gather_train_shards joins)."""
    from merv.data.parts import read_plan

    return W.part_dirs(wildcards.shardset, wildcards.split, read_plan(train_plan(wildcards))["parts"])


def train_part_digest(wildcards):
    """What a part's shards depend on (its samples, its media's stats): the part's job reruns when it changes."""
    from merv.data.parts import part_digest

    return part_digest(train_plan(wildcards), wildcards.part)


def feature_weights(wildcards):
    """The weights a feature extraction loads; ancient where merv.workflow says time must not count."""
    return [ancient(p) if old else p for p, old in W.feature_weights(wildcards.model, wildcards.cache)]


def feature_parts(wildcards):
    """The parts of a feature cache: its split's part plan (known once the plan checkpoint ran)."""
    from merv.data.parts import read_plan

    split = W.feature_cache(wildcards.model, wildcards.cache)["split"]
    return read_plan(checkpoints.plan_train_parts.get(split=split).output[0])["parts"]
