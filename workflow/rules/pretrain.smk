# Pretraining stage: tiny specialised encoders, each trained on its own synthetic pretext task (config `pretrain`),
# written where real weights would be read from: data/weights/pretrained/<name>. Models name them in
# `pretrained_encoders`; their training stages then depend on these folders.


rule pretrain_encoder:
    output:
        directory(f"{PRETRAINED_DIR}/{{name}}"),
    wildcard_constraints:
        name="[A-Za-z0-9_]+",
    threads: compute_threads()
    params:
        config=pretrain_config_json,
        encoder=pretrain_encoder_json,  # not passed: it records the preset's architecture, so an edit reruns this
        compute=compute_flags(),
    log:
        "results/logs/pretrain_encoder_{name}.log",
    conda:
        MERV_ENV
    shell:
        "merv pretrain --config {params.config:q} --out {output} {params.compute} > {log} 2>&1"
