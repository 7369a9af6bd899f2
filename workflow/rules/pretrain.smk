# Pretraining stage: tiny specialised encoders, each trained on its own synthetic pretext task (config `pretrain`),
# written where real weights would be read from: data/weights/pretrained/<name>. Models name them in
# `pretrained_encoders`; their training stages then depend on these folders.


rule pretrain_encoder:
    output:
        directory(f"{PRETRAINED_DIR}/{{name}}"),
    wildcard_constraints:
        name="[A-Za-z0-9_]+",
    threads: W.threads
    # scheduling only (no rerun): the longest chain starts first, every model that loads an encoder waits for it
    priority: 30
    params:
        config=lambda w: W.pretrain_job(w.name),
        architecture=lambda w: W.pretrain_architecture(w.name),  # not passed: a preset edit reruns this
        compute=W.compute_flags,
    benchmark:
        "results/benchmarks/pretrain_encoder_{name}.tsv"
    log:
        "results/logs/pretrain_encoder_{name}.log",
    conda:
        MERV_ENV
    shell:
        "merv pretrain --config {params.config} --out {output} {params.compute} > {log} 2>&1"
