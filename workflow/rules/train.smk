# Training stage: one generic rule; a model's stages (align, finetune, ...) come from its preset, each starting
# from the previous stage's checkpoint, under each of the model's seeds (merv.workflow: report.seeds).


rule train_stage:
    input:
        unpack(lambda w: W.stage_inputs(w.model, w.seed, w.stage)),
    output:
        report(
            directory("results/{model}/seed-{seed}/train/{stage}"),
            patterns=["{name}.png"],  # the loss curve
            caption="../report/loss.rst",
            category="Training",
            labels={"model": "{model}", "seed": "{seed}", "stage": "{stage}"},
        ),
    threads: W.threads
    priority: 10  # scheduling only: long jobs before the short evaluations, which then fill the last cores
    resources:
        # how a stage is launched does not change what it computes: resources, so they trigger no rerun
        launch=lambda w: W.launch_flags(w.model, w.seed),
        gpu=W.train_gpus(),
    params:
        config=lambda w: W.stage_job(w.model, w.seed, w.stage),
        flags=lambda w: W.train_flags(w.model, w.seed, w.stage),
        compute=W.compute_flags,
        workers=W.compute.loader_workers,
    log:
        "results/{model}/seed-{seed}/logs/train_{stage}.log",
    benchmark:
        "results/{model}/seed-{seed}/benchmarks/train_{stage}.tsv"
    conda:
        MERV_ENV
    shell:
        "merv train --config {params.config} --stage {wildcards.stage} --data {input.data} {params.flags}"
        " --out {output} {params.compute} --workers {params.workers} {resources.launch} --no-progress > {log} 2>&1"
