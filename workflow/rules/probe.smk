# Probe stage: linear probes of the pretrained encoders' frozen features for the benchmark's colour, shape and
# direction (merv probe, merv/pretrain/probe.py), each encoder as trained and at its random initialisation. A target
# of its own (not in the default one yet):  snakemake results/probe/probe.md


rule probe_encoders:
    input:
        expand(f"{PRETRAINED_DIR}/{{name}}", name=sorted(config.get("pretrain") or {})),
    output:
        "results/probe/probe.csv",
        "results/probe/probe.md",
        "results/probe/probe.json",
    params:
        pretrain=lambda w: W.probe_job(),
        root=lambda w, input: input[0].rsplit("/", 1)[0],  # data/weights/pretrained
        out=lambda w, output: output[0].rsplit("/", 1)[0],
        compute=W.compute_flags,
    threads: W.threads
    log:
        "results/logs/probe_encoders.log",
    conda:
        MERV_ENV
    shell:
        "merv probe --pretrain {params.pretrain} --root {params.root} --out {params.out} {params.compute}"
        " > {log} 2>&1"
