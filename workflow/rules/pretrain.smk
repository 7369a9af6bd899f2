# Pretraining stage: tiny specialised encoders, each trained on its own synthetic pretext task (config `pretrain`),
# written where real weights would be read from: data/weights/pretrained/<name>. Models name them in
# `pretrained_encoders`; their training stages then depend on these folders.


rule pretrain_encoder:
    output:
        directory(f"{PRETRAINED_DIR}/{{name}}"),
    wildcard_constraints:
        name="[A-Za-z0-9_]+",
    threads: 1  # two encoders train side by side on a 2-core machine
    params:
        config=pretrain_config_json,
    log:
        "results/logs/pretrain_encoder_{name}.log",
    conda:
        MERV_ENV
    shell:
        "merv pretrain --config {params.config:q} --out {output} --threads {threads} > {log} 2>&1"
