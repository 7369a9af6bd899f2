# Weights stage: toy weights built here (tiny, standin), or the real ones fetched once from their sources.


rule build_tiny_weights:
    output:
        directory("data/weights/{model}/built"),
    params:
        config=lambda w: W.weights_job(w.model),
        kind=lambda w: W.build_kind(w.model),
        skip=lambda w: W.skip_encoder_flags(w.model),
    log:
        "results/{model}/logs/build_tiny_weights.log",
    conda:
        MERV_ENV
    shell:
        "merv build-tiny --config {params.config} --kind {params.kind} {params.skip} > {log} 2>&1"


# Downloads need the network, which cluster compute nodes often lack: this job runs where snakemake runs.
localrules:
    fetch_weights,


rule fetch_weights:
    output:
        "data/weights/{model}/fetched.json",
    params:
        config=lambda w: W.weights_job(w.model),
    log:
        "results/{model}/logs/fetch_weights.log",
    conda:
        MERV_ENV
    shell:
        "merv fetch-weights {params.config} --record {output} > {log} 2>&1"
