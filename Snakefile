# merv: raw videos -> WebDataset shards -> stage 1 (align) -> stage 2 (finetune) -> benchmark evaluation.
# Run: snakemake results/merv_tiny/eval.json, or `snakemake` for every model in pipeline.models (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


# `snakemake --report report.html`: the DAG, each job's runtime, and the outputs the rules mark with report()
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand("results/{model}/eval.json", model=W.selected),
        W.report_outputs(),
    default_target: True
