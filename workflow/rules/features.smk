# Feature stage: each frozen encoder's outputs over a training split, computed once for every stage and epoch of a
# model that caches them (train.features: cached in its preset).


rule extract_features:
    input:
        # rebuilt shards (a changed training JSON or video, or new shard settings) re-extract; another encoder's frame
        # count changes neither the shards nor this cache's name, so it keeps the cache. (The shards must not be
        # ancient: Snakemake skips its own time check for a job below one that reruns and reaches it only through
        # ancient files.) Training checks the cache against the shards by content anyway.
        shards=lambda w: W.train_shards(w.model, W.feature_cache(w.model, w.cache)["split"]),
        weights=feature_weights,
    output:
        directory("data/features/{model}/{cache}"),
    params:
        config=lambda w: W.features_job(w.model),
        encoder=lambda w: W.feature_cache(w.model, w.cache)["encoder"],
        dtype=lambda w: W.runs[w.model].train.feature_dtype,
        compute=W.compute_flags,
    threads: W.threads
    benchmark:
        "results/{model}/benchmarks/extract_features_{cache}.tsv"
    log:
        "results/{model}/logs/extract_features_{cache}.log",
    conda:
        MERV_ENV
    shell:
        "merv features {input.shards} --config {params.config} --encoder {params.encoder} --dtype {params.dtype}"
        " --out {output} {params.compute} --no-progress > {log} 2>&1"

