# Evaluation stage, scatter/gather: every benchmark in `eval.num_chunks` chunk jobs (eval_benchmark, the GPU jobs),
# joined with an exactly-once check (merge_eval), then one results/<model>/eval.json (collect_eval). Answers and
# judge verdicts go to a content-addressed cache (eval.cache_dir), so rerunning a job repeats no model or judge call.
rule eval_benchmark:
    input:
        model=final_checkpoint,
        data=benchmark_shards,
        # the frozen encoders and the LLM the checkpoint loads (its answers depend on them too)
        weights=weights_input,
    output:
        "results/{model}/eval/{bench}/chunk-{chunk}-of-{chunks}.json",
    wildcard_constraints:
        model="[A-Za-z0-9_]+",
        bench="[^/]+",
        chunk=r"\d+",
        chunks=r"\d+",
    params:
        options=eval_options(),
        cache=config["eval"]["cache_dir"],
        compute=compute_flags(),
    threads: compute_threads()
    resources:
        judge=judge_access_flags,
    log:
        "results/{model}/logs/eval_{bench}_chunk-{chunk}-of-{chunks}.log",
    conda:
        MERV_ENV
    shell:
        "merv eval --model {input.model} --data {input.data} --name {wildcards.bench}"
        " --num-chunks {wildcards.chunks} --chunk-index {wildcards.chunk} --cache {params.cache}"
        " {params.options} {params.compute} {resources.judge} --out {output} > {log} 2>&1"


rule merge_eval:
    input:
        eval_chunks,
    output:
        "results/{model}/eval/{bench}.json",
    wildcard_constraints:
        model="[A-Za-z0-9_]+",
        bench="[^/]+",
    log:
        "results/{model}/logs/merge_eval_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv merge {input} --out {output} > {log} 2>&1"


rule collect_eval:
    input:
        eval_results,
    output:
        report("results/{model}/eval.json", category="Results", labels={"model": "{model}", "file": "eval.json"}),
    log:
        "results/{model}/logs/collect_eval.log",
    conda:
        MERV_ENV
    shell:
        "merv collect {input} --model {wildcards.model} --out {output} > {log} 2>&1"
