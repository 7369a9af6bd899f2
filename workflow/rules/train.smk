# Training stage: one generic rule; a model's stages (align, finetune, ...) come from its preset, each starting
# from the previous stage's checkpoint.


rule train_stage:
    input:
        unpack(stage_inputs),
    output:
        directory("results/{model}/{stage}"),
    wildcard_constraints:
        stage="(?!eval$|logs$)[A-Za-z0-9_]+",
    threads: workflow.cores  # one training job uses the whole machine
    resources:
        # how a stage is launched does not change what it computes: a resource, so it triggers no rerun
        launch=launch_flags,
    params:
        config=stage_config_json,
        init=init_flag,
        features=features_flags,
    log:
        "results/{model}/logs/train_{stage}.log",
    conda:
        MERV_ENV
    shell:
        "merv train --config {params.config:q} --stage {wildcards.stage} --data {input.data} {params.init}"
        " {params.features} --out {output} {resources.launch} --no-progress > {log} 2>&1"
