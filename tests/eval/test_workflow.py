"""The evaluation rules of the real Snakemake workflow (eval_benchmark -> merge_eval -> collect_eval), run on a
checkpoint and shards made by the session fixtures, with a stand-in judge over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from merv.eval.benchmark import CheckpointHandle, EvalSettings, evaluate
from merv.eval.cache import ResultCache
from merv.eval.judge import Judge, JudgeConfig
from merv.pipeline import weights_inputs
from tests.helpers import REPO, planned_jobs
from tests.helpers import snakemake as run_snakemake

pytestmark = pytest.mark.slow

# Only the evaluation stage: the checkpoint and the shards are inputs here, not outputs of other rules.
SNAKEFILE = f"""
from snakemake.utils import validate
configfile: "config/config.yaml"
validate(config, "{REPO}/workflow/schemas/config.schema.yaml")
include: "{REPO}/workflow/rules/common.smk"
include: "{REPO}/workflow/rules/eval.smk"
"""


def snakemake(workdir: Path, *args: str):
    return run_snakemake(workdir, *args, snakefile="Snakefile", timeout=600)


def jobs(res: subprocess.CompletedProcess) -> dict[str, int]:
    return planned_jobs(res.stdout + res.stderr)


def comparable(result: dict) -> dict:
    return {k: result[k] for k in ("benchmark", "questions", "config_fingerprint", "summary", "rows")}


def test_three_chunks_equal_one_and_a_lost_answer_fails_the_merge(checkpoint, shards, start_judge, tiny_run, tmp_path):
    server = start_judge("--model", "judge-z")
    work = tmp_path / "work"
    seed = work / "results" / "merv_tiny" / "seed-0"
    shutil.copytree(checkpoint, seed / "train" / "finetune")
    shutil.copytree(shards["synth_open"], work / "data" / "shards" / "small" / "eval" / "synth_open")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # one benchmark keeps the test short: chunked MCQ results are compared with unchunked ones in test_benchmark.py
    cfg["data"]["benchmarks"] = {"synth_open": "data/synth/eval_data/synth_open"}
    cfg["eval"].update(batch_size=2, num_chunks=3)
    cfg["report"]["seeds"] = [0]
    cfg["eval"]["judge"].update(url=server.url, model="judge-z")
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (work / "Snakefile").write_text(SNAKEFILE)
    # the weights folders an evaluation depends on are its inputs (the checkpoint names the weights it loads)
    for folder in weights_inputs(cfg, "merv_tiny"):
        shutil.copytree(Path(tiny_run.model.llm.weights).parent, work / folder)

    res = snakemake(work, "results/merv_tiny/eval.json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert jobs(res) == {"eval_benchmark": 3, "merge_eval": 1, "collect_eval": 1, "collect_seeds": 1}
    eval_json = json.loads((seed / "eval.json").read_text())
    assert eval_json["benchmarks"]["synth_open"]["metric"] == "judge_accuracy"

    # the unchunked evaluation, in this process with its own cache (so everything is computed again)
    judge = Judge(JudgeConfig(url=server.url, model="judge-z"))
    merged = json.loads((seed / "eval" / "synth_open.json").read_text())
    whole = evaluate(
        CheckpointHandle(checkpoint), shards["synth_open"], "synth_open", EvalSettings(batch_size=2),
        ResultCache(tmp_path / "own-cache"), judge,
    )  # fmt: skip
    assert merged["chunk"]["merged_from"] == 3 and whole["summary"]["judged"] == 6
    assert comparable(merged) == comparable(whole)
    summary = {k: v for k, v in eval_json["benchmarks"]["synth_open"].items() if k in whole["summary"]}
    assert summary == whole["summary"]

    # nothing to do again; other chunking plans only evaluation jobs (whose answers the cache holds)
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(work, "-n", "results/merv_tiny/eval.json"))
    cfg["eval"]["num_chunks"] = 2
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert jobs(snakemake(work, "-n", "results/merv_tiny/eval.json")) == {
        "eval_benchmark": 2,
        "merge_eval": 1,
        "collect_eval": 1,
        "collect_seeds": 1,
    }
    cfg["eval"]["num_chunks"] = 3
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))

    # a chunk that lost an answer: the merge fails naming the question, and writes nothing
    chunk = seed / "eval" / "synth_open" / "chunk-1-of-3.json"
    data = json.loads(chunk.read_text())
    lost = data["rows"].pop()["question_id"]
    chunk.write_text(json.dumps(data))
    res = snakemake(work, "results/merv_tiny/eval.json")
    assert res.returncode != 0
    log = (seed / "logs" / "merge_eval_synth_open.log").read_text()
    assert f"missing question ids '{lost}'" in log and "Traceback" not in log
    assert not (seed / "eval" / "synth_open.json").exists()
