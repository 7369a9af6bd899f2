# merv: raw videos -> WebDataset shards -> stage 1 (align) -> stage 2 (finetune) -> benchmark evaluation.
# Run: snakemake --cores 2 results/merv_tiny/eval.json   (see README.md)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"


rule all:
    input:
        expand("results/{model}/eval.json", model=config["models"]),
    default_target: True
