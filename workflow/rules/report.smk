# Report stage: the paper's tables and figures across the models config `report` lists (results/tables/).


rule make_tables:
    input:
        unpack(report_inputs),
    output:
        report_outputs(config),
    params:
        spec=report_spec_json,
        compute=compute_flags(),  # the fusion-weight figure runs a model
    threads: compute_threads()
    log:
        "results/logs/make_tables.log",
    conda:
        MERV_ENV
    shell:
        "merv report --spec {params.spec:q} --out results/tables {params.compute} > {log} 2>&1"
