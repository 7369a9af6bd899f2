# Evaluation stage: each benchmark separately, then one results/<model>/eval.json.


rule eval_benchmark:
    input:
        model=final_checkpoint,
        data=benchmark_shards,
    output:
        "results/{model}/eval/{bench}.json",
    params:
        batch_size=config["eval"]["batch_size"],
        max_new_tokens=config["eval"]["max_new_tokens"],
    log:
        "results/{model}/logs/eval_{bench}.log",
    conda:
        MERV_ENV
    shell:
        "merv eval --model {input.model} --data {input.data} --name {wildcards.bench} --out {output}"
        " --batch-size {params.batch_size} --max-new-tokens {params.max_new_tokens} > {log} 2>&1"


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
