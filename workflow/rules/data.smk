# Data stage: the built-in synthetic dataset and WebDataset sharding (one shard set per frame layout).


rule synth_dataset:
    output:
        W.synth_outputs(),
        summary="data/synth/summary.json",
    params:
        seed=config["synth"]["seed"],
        train=config["synth"]["train_videos"],
        eval=config["synth"]["eval_videos"],
        size=config["synth"]["size"],
        frames=config["synth"]["frames"],
        fps=config["synth"]["fps"],
    benchmark:
        "results/benchmarks/synth_dataset.tsv"
    log:
        "results/logs/synth_dataset.log",
    conda:
        MERV_ENV
    shell:
        "merv synth --out data/synth --seed {params.seed} --train-videos {params.train} --eval-videos {params.eval}"
        " --size {params.size} --frames {params.frames} --fps {params.fps} > {log} 2>&1"


# The media a benchmark reads, with size and mtime (merv.data.media): its shard rule reads this instead of listing
# every video as an input; common.smk rewrites it when a video is added, removed or replaced, so that reaches a rerun.
# Listing files and planning parts is no cluster job's work: these run where Snakemake runs.
localrules:
    plan_train_parts,
    gather_train_shards,
    index_benchmark_media,


rule index_benchmark_media:
    input:
        questions=lambda w: f"{W.benchmark_dir(w.bench)}/test_q.json",
    output:
        "data/media/eval/{bench}.json",
    params:
        bench=lambda w: W.benchmark_dir(w.bench),
    log:
        "results/logs/index_benchmark_media_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv index-media {params.bench} --out {output} > {log} 2>&1"


# A training split is sharded scatter-gather (merv.data.parts): the plan cuts its JSON into parts of
# shards.items_per_part samples (ranges of the JSON's order: appending leaves the full parts as they are), one job
# per part writes that part's shards, and the gather writes the split's folder (hard links) and manifest once.
checkpoint plan_train_parts:
    input:
        json=lambda w: W.train_split(w.split)["json"],
    output:
        directory("data/media/train/{split}"),
    params:
        root=lambda w: W.train_root(w.split),
        items_per_part=config["shards"]["items_per_part"],
    log:
        "results/logs/plan_train_parts_{split}.log",
    conda:
        MERV_ENV
    shell:
        "merv plan-parts {input.json} --root {params.root} --items-per-part {params.items_per_part} --out {output}"
        " > {log} 2>&1"


rule shard_train_part:
    input:
        # ancient: a new plan rewrites every part's files; a part reruns when its content changes (params.content:
        # its samples and its media's size and mtime), which a replaced video also does (common.smk restats them)
        plan=lambda w: ancient(train_plan(w)),
    output:
        directory("data/shards/{shardset}/parts/train/{split}/{part}"),
    threads: config["shards"]["workers"]
    params:
        content=train_part_digest,
        part=lambda w: f"{train_plan(w)}/{w.part}.json",
        root=lambda w: W.train_root(w.split),
        settings=lambda w: W.shard_settings(w.shardset),
    benchmark:
        "results/benchmarks/shard_train_part_{shardset}_{split}_{part}.tsv"
    log:
        "results/logs/shard_train_part_{shardset}_{split}_{part}.log",
    conda:
        MERV_ENV
    shell:
        "merv shard {params.part} --root {params.root} --out {output} --frames {params.settings[frames]}"
        " --size {params.settings[size]} {params.settings[options]} --workers {threads} --no-progress > {log} 2>&1"


rule gather_train_shards:
    input:
        train_parts,
    output:
        directory("data/shards/{shardset}/train/{split}"),
    log:
        "results/logs/gather_train_shards_{shardset}_{split}.log",
    conda:
        MERV_ENV
    shell:
        "merv gather-shards {input} --out {output} > {log} 2>&1"


rule shard_benchmark:
    input:
        questions=lambda w: f"{W.benchmark_dir(w.bench)}/test_q.json",
        answers=lambda w: f"{W.benchmark_dir(w.bench)}/test_a.json",
        media="data/media/eval/{bench}.json",
    output:
        directory("data/shards/{shardset}/eval/{bench}"),
    threads: config["shards"]["workers"]
    params:
        bench=lambda w: W.benchmark_dir(w.bench),
        settings=lambda w: W.shard_settings(w.shardset),
    benchmark:
        "results/benchmarks/shard_benchmark_{shardset}_{bench}.tsv"
    log:
        "results/logs/shard_benchmark_{shardset}_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv shard {params.bench} --out {output} --frames {params.settings[frames]} --size {params.settings[size]}"
        " {params.settings[options]} --workers {threads} --no-progress > {log} 2>&1"


# Every shard folder the selected models read: what DVC's `shards` stage makes (`snakemake all_shards`). A target
# rule, not `--until`: Snakemake leaves out the part jobs that a plan checkpoint creates when --until filters the DAG.
rule all_shards:
    input:
        W.all_shards(),
