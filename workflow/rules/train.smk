# Training stage: one generic rule; a model's stages (align, finetune, ...) come from its preset, each starting
# from the previous stage's checkpoint.


rule train_stage:
    input:
        unpack(stage_inputs),
    output:
        report(
            directory("results/{model}/train/{stage}"),
            patterns=["{name}.png"],  # the loss curve
            caption="../report/loss.rst",
            category="Training",
            labels={"model": "{model}", "stage": "{stage}"},
        ),
    threads: compute_threads()
    resources:
        # how a stage is launched does not change what it computes: resources, so they trigger no rerun
        launch=launch_flags,
        gpu=train_gpus,
    params:
        config=stage_config_json,
        init=init_flag,
        features=features_flags,
        compute=compute_flags(),
        workers=COMPUTE.loader_workers,
    log:
        "results/{model}/logs/train_{stage}.log",
    conda:
        MERV_ENV
    shell:
        "merv train --config {params.config:q} --stage {wildcards.stage} --data {input.data} {params.init}"
        " {params.features} --out {output} {params.compute} --workers {params.workers} {resources.launch}"
        " --no-progress > {log} 2>&1"
