# Evaluation stage, scatter/gather: every benchmark in `eval.num_chunks` chunk jobs (eval_benchmark, the GPU jobs),
# joined with an exactly-once check (merge_eval), then one eval.json per seed (collect_eval) and the model's
# results/<model>/eval.json over its seeds (collect_seeds). Answers and judge verdicts go to a content-addressed cache
# (eval.cache_dir), so rerunning a job repeats no model or judge call.
rule eval_benchmark:
    input:
        model=lambda w: W.final_checkpoint(w.model, w.seed),
        data=lambda w: W.benchmark_shards(w.model, w.bench),
        # the frozen encoders and the LLM the checkpoint loads (its answers depend on them too)
        weights=lambda w: W.weights_inputs(w.model),
    output:
        "results/{model}/seed-{seed}/eval/{bench}/chunk-{chunk}-of-{chunks}.json",
    wildcard_constraints:
        bench="[^/]+",
        chunk=r"\d+",
        chunks=r"\d+",
    params:
        options=W.eval_options(),
        cache=config["eval"]["cache_dir"],
        compute=W.compute_flags,
    threads: W.threads
    resources:
        judge=W.judge_access_flags(),
    log:
        "results/{model}/seed-{seed}/logs/eval_{bench}_chunk-{chunk}-of-{chunks}.log",
    benchmark:
        "results/{model}/seed-{seed}/benchmarks/eval_{bench}_chunk-{chunk}-of-{chunks}.tsv"
    conda:
        MERV_ENV
    shell:
        "merv eval --model {input.model} --data {input.data} --name {wildcards.bench}"
        " --num-chunks {wildcards.chunks} --chunk-index {wildcards.chunk} --cache {params.cache}"
        " {params.options} {params.compute} {resources.judge} --out {output} > {log} 2>&1"


rule merge_eval:
    input:
        lambda w: W.eval_chunks(w.model, w.seed, w.bench),
    output:
        "results/{model}/seed-{seed}/eval/{bench}.json",
    wildcard_constraints:
        bench="[^/]+",
    log:
        "results/{model}/seed-{seed}/logs/merge_eval_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv merge {input} --out {output} > {log} 2>&1"


rule collect_eval:
    input:
        lambda w: W.eval_results(w.model, w.seed),
    output:
        "results/{model}/seed-{seed}/eval.json",
    log:
        "results/{model}/seed-{seed}/logs/collect_eval.log",
    conda:
        MERV_ENV
    shell:
        "merv collect {input} --model {wildcards.model} --seed {wildcards.seed} --out {output} > {log} 2>&1"


rule collect_seeds:
    input:
        lambda w: W.seed_results(w.model),
    output:
        report("results/{model}/eval.json", category="Results", labels={"model": "{model}", "file": "eval.json"}),
    log:
        "results/{model}/logs/collect_seeds.log",
    conda:
        MERV_ENV
    shell:
        "merv collect-seeds {input} --model {wildcards.model} --out {output} > {log} 2>&1"
