# Feature stage: each frozen encoder's outputs over a training split, computed once for every stage, epoch and seed
# of a model that caches them (train.features: cached in its preset). Scatter–gather like the split's shards
# (merv.features.parts): one job per shard part extracts that part's features (a Slurm job with a GPU under the
# profile), and a local gather links the parts into the cache and writes its manifest once, with the bytes of one
# extraction over the whole split.


localrules:
    gather_features,


rule extract_feature_part:
    input:
        # the part's own shard folder: the tars the gathered split links. It is rewritten only when the part's
        # samples or videos change (shard_train_part is keyed by content), so appending to a training JSON reruns
        # the last part and the new ones; another encoder's frame count changes neither the shards nor this cache's
        # name, so it keeps the cache. Training checks the cache against the shards by content anyway.
        shards=lambda w: W.feature_part(w.model, w.cache, w.part)["shards"],
        weights=feature_weights,
    output:
        directory("data/features/{model}/parts/{cache}/{part}"),
    wildcard_constraints:
        cache="[^/]+",
    params:
        config=lambda w: W.features_job(w.model),
        encoder=lambda w: W.feature_cache(w.model, w.cache)["encoder"],
        dtype=lambda w: W.runs[w.model].train.feature_dtype,
        compute=W.compute_flags,
    threads: W.threads
    priority: 20  # scheduling only: a cache gates every training stage of the models that read it
    benchmark:
        "results/{model}/benchmarks/extract_features_{cache}_{part}.tsv"
    log:
        "results/{model}/logs/extract_feature_part_{cache}_{part}.log",
    conda:
        MERV_ENV
    shell:
        "merv features {input.shards} --config {params.config} --encoder {params.encoder} --dtype {params.dtype}"
        " --out {output} {params.compute} --no-progress > {log} 2>&1"


rule gather_features:
    input:
        parts=lambda w: W.feature_part_dirs(w.model, w.cache, feature_parts(w)),
        shards=lambda w: W.train_shards(w.model, W.feature_cache(w.model, w.cache)["split"]),
    output:
        directory("data/features/{model}/{cache}"),
    wildcard_constraints:
        cache="[^/]+",
    log:
        "results/{model}/logs/gather_features_{cache}.log",
    conda:
        MERV_ENV
    shell:
        "merv gather-features {input.parts} --shards {input.shards} --out {output} > {log} 2>&1"


# Every feature cache the selected models read (`snakemake all_features`): extraction alone, e.g. on a GPU partition
# before training.
rule all_features:
    input:
        sorted(f"data/features/{m}/{c}" for m, c in W.feature_caches if m in W.selected),
