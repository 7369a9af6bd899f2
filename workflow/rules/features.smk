# Feature stage: each frozen encoder's outputs over a training split, computed once for every stage and epoch of a
# model that caches them (train.features: cached in its preset).


rule extract_features:
    input:
        # the shards are checked by content (the frames this encoder reads) when training opens the cache; by time
        # they would make every encoder's cache stale whenever another encoder's frame count changes
        shards=lambda w: ancient(train_shards(w.model, feature_cache(w)["split"])),
        # built weights are a function of the encoder's config, which names the cache; their content hash is in the
        # cache key, checked when training opens it
        weights=lambda w: [ancient(p) for p in weights_inputs(config, w.model)],
    output:
        directory("data/features/{model}/{cache}"),
    params:
        # only the model: a change to a training stage does not touch the features
        config=lambda w: json.dumps({"model": RUNS[w.model].to_dict()["model"]}, sort_keys=True),
        encoder=lambda w: feature_cache(w)["encoder"],
        dtype=lambda w: RUNS[w.model].train.feature_dtype,
        compute=compute_flags(),
    threads: compute_threads()
    log:
        "results/{model}/logs/extract_features_{cache}.log",
    conda:
        MERV_ENV
    shell:
        "merv features {input.shards} --config {params.config:q} --encoder {params.encoder} --dtype {params.dtype}"
        " --out {output} {params.compute} --no-progress > {log} 2>&1"

