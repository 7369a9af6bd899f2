# Report stage: the paper's tables and figures across the models config `report` lists, each under every seed of
# report.seeds (results/tables/: mean and 95% CI over seeds and questions, paired comparisons).


rule make_tables:
    input:
        unpack(lambda w: W.report_inputs()),
    output:
        W.report_outputs(),
    params:
        spec=lambda w: W.report_job(),
        out=lambda w, output: Path(output[0]).parent,  # results/tables
        compute=W.compute_flags,  # the fusion-weight figure runs a model
    threads: W.threads
    log:
        "results/logs/make_tables.log",
    benchmark:
        "results/benchmarks/make_tables.tsv"
    conda:
        MERV_ENV
    shell:
        "merv report --spec {params.spec} --out {params.out} {params.compute} > {log} 2>&1"
