# Feature stage: each frozen encoder's outputs over a training split, computed once for every stage and epoch of a
# model that caches them (train.features: cached in its preset). Scatter–gather like the split's shards
# (merv.features.parts): one job per shard part extracts that part's features (a Slurm job with a GPU under the
# profile), and a local gather links the parts into the cache and writes its manifest once, with the bytes of one
# extraction over the whole split.

from merv.features.parts import feature_part_dirs, shard_part_dir


localrules:
    gather_features,


rule extract_feature_part:
    input:
        # the part's own shard folder: the tars the gathered split links. It is rewritten only when the part's
        # samples or videos change (shard_train_part is keyed by content), so appending to a training JSON reruns
        # the last part and the new ones; another encoder's frame count changes neither the shards nor this cache's
        # name, so it keeps the cache. Training checks the cache against the shards by content anyway.
        shards=lambda w: shard_part_dir(SHARD_SETS[w.model], feature_cache(w)["split"], w.part),
        weights=feature_weights,
    output:
        directory("data/features/{model}/parts/{cache}/{part}"),
    wildcard_constraints:
        cache="[^/]+",
    params:
        # only the model: a change to a training stage does not touch the features
        config=lambda w: json.dumps({"model": RUNS[w.model].to_dict()["model"]}, sort_keys=True),
        encoder=lambda w: feature_cache(w)["encoder"],
        dtype=lambda w: RUNS[w.model].train.feature_dtype,
        compute=compute_flags(),
    threads: compute_threads()
    log:
        "results/{model}/logs/extract_feature_part_{cache}_{part}.log",
    conda:
        MERV_ENV
    shell:
        "merv features {input.shards} --config {params.config:q} --encoder {params.encoder} --dtype {params.dtype}"
        " --out {output} {params.compute} --no-progress > {log} 2>&1"


rule gather_features:
    input:
        parts=lambda w: feature_part_dirs(
            checkpoints.plan_train_parts.get(split=feature_cache(w)["split"]).output[0], w.model, w.cache
        ),
        shards=lambda w: train_shards(w.model, feature_cache(w)["split"]),
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
        sorted(f"data/features/{m}/{c}" for m, c in FEATURE_CACHES if m in SELECTED),
