# Data stage: the built-in synthetic dataset and WebDataset sharding (one shard set per frame layout).


rule synth_dataset:
    output:
        synth_outputs(),
        summary="data/synth/summary.json",
    params:
        seed=config["synth"]["seed"],
        train=config["synth"]["train_videos"],
        eval=config["synth"]["eval_videos"],
        size=config["synth"]["size"],
        frames=config["synth"]["frames"],
        fps=config["synth"]["fps"],
    log:
        "results/logs/synth_dataset.log",
    conda:
        MERV_ENV
    shell:
        "merv synth --out data/synth --seed {params.seed} --train-videos {params.train} --eval-videos {params.eval}"
        " --size {params.size} --frames {params.frames} --fps {params.fps} > {log} 2>&1"


# The media a source reads, with size and mtime (merv.data.media): the shard rules read this instead of listing
# every video as an input; common.smk rewrites it when a video is added, removed or replaced, so that reaches a rerun.
# Listing files is no cluster job's work: these run where Snakemake runs.
localrules:
    index_train_media,
    index_benchmark_media,


rule index_train_media:
    input:
        json=lambda w: train_split(w)["json"],
    output:
        "data/media/train/{split}.json",
    params:
        root=lambda w: f"--root {train_split(w)['root']}" if "root" in train_split(w) else "",
    log:
        "results/logs/index_train_media_{split}.log",
    conda:
        MERV_ENV
    shell:
        "merv index-media {input.json} {params.root} --out {output} > {log} 2>&1"


rule index_benchmark_media:
    input:
        questions=lambda w: f"{benchmark_dir(w)}/test_q.json",
    output:
        "data/media/eval/{bench}.json",
    params:
        bench=benchmark_dir,
    log:
        "results/logs/index_benchmark_media_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv index-media {params.bench} --out {output} > {log} 2>&1"


rule shard_train:
    input:
        unpack(lambda w: {"json": train_split(w)["json"], "media": f"data/media/train/{w.split}.json"}),
    output:
        directory("data/shards/{shardset}/train/{split}"),
    threads: config["shards"]["workers"]
    params:
        root=lambda w: f"--root {train_split(w)['root']}" if "root" in train_split(w) else "",
        settings=shard_settings,
    log:
        "results/logs/shard_train_{shardset}_{split}.log",
    conda:
        MERV_ENV
    shell:
        "merv shard {input.json} {params.root} --out {output} --frames {params.settings[frames]}"
        " --size {params.settings[size]} {params.settings[options]} --workers {threads} --no-progress > {log} 2>&1"


rule shard_benchmark:
    input:
        questions=lambda w: f"{benchmark_dir(w)}/test_q.json",
        answers=lambda w: f"{benchmark_dir(w)}/test_a.json",
        media="data/media/eval/{bench}.json",
    output:
        directory("data/shards/{shardset}/eval/{bench}"),
    threads: config["shards"]["workers"]
    params:
        bench=benchmark_dir,
        settings=shard_settings,
    log:
        "results/logs/shard_benchmark_{shardset}_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv shard {params.bench} --out {output} --frames {params.settings[frames]} --size {params.settings[size]}"
        " {params.settings[options]} --workers {threads} --no-progress > {log} 2>&1"
