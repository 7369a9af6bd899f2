"""merv.workflow: what the Snakemake rules compute (paths, inputs, job files, options, seeds, dvc.yaml), on the
real config, without running Snakemake; and that no job's command line carries a JSON blob (a real dry run)."""

import copy
import json
import re
import subprocess
import sys

import pytest
import yaml

from merv.workflow import JOBS_DIR, Workflow, load_pipeline_config, write_job_file
from tests.helpers import REPO, snakemake, write_config

CONFIG = load_pipeline_config([REPO / "config" / "config.yaml"])


@pytest.fixture
def workflow(tmp_path) -> Workflow:
    return Workflow(copy.deepcopy(CONFIG), root=tmp_path)


def edited(change) -> dict:
    config = copy.deepcopy(CONFIG)
    change(config)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Job files


def test_a_job_file_is_named_by_its_content_and_written_once(tmp_path):
    first = write_job_file("train", {"b": 1, "a": [1, 2]}, tmp_path)
    assert re.fullmatch(rf"{JOBS_DIR}/train-[0-9a-f]{{16}}\.json", first)
    assert json.loads((tmp_path / first).read_text()) == {"a": [1, 2], "b": 1}
    mtime = (tmp_path / first).stat().st_mtime_ns
    assert write_job_file("train", {"a": [1, 2], "b": 1}, tmp_path) == first, "key order is not content"
    assert (tmp_path / first).stat().st_mtime_ns == mtime, "an existing job file is not rewritten"
    assert write_job_file("train", {"a": [1, 2], "b": 2}, tmp_path) != first
    (tmp_path / first).write_text("{}")  # a damaged file is put right
    assert write_job_file("train", {"b": 1, "a": [1, 2]}, tmp_path) == first
    assert json.loads((tmp_path / first).read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in (tmp_path / JOBS_DIR).iterdir() if p.name.startswith(".")) == [], "no temp left"


def test_a_stage_job_holds_that_stage_and_the_seed_only(workflow, tmp_path):
    path = workflow.stage_job("merv_tiny", "1", "finetune")
    run = json.loads((tmp_path / path).read_text())
    assert [s["name"] for s in run["train"]["stages"]] == ["finetune"]
    assert run["train"]["seed"] == workflow.runs["merv_tiny"].train.seed + 1
    assert workflow.stage_job("merv_tiny", "0", "finetune") != path, "another seed is another job"

    def lr(stage):
        def change(config):  # a new dict: the schema's default {} is one object shared by every model
            config["models"]["merv_tiny"]["overrides"] = {"train": {"stages": {stage: {"lr": 1e-3}}}}

        return change

    other_stage = Workflow(edited(lr("align")), root=tmp_path)
    assert other_stage.stage_job("merv_tiny", "1", "finetune") == path, "editing align keeps finetune's job"
    this_stage = Workflow(edited(lr("finetune")), root=tmp_path)
    assert this_stage.stage_job("merv_tiny", "1", "finetune") != path


def test_weights_jobs_ignore_what_the_weights_do_not_depend_on(workflow):
    path = workflow.weights_job("merv_tiny")
    projector = Workflow(
        edited(lambda c: c["models"]["merv_tiny"].update(overrides={"model": {"projector": {"temporal_tokens": 2}}})),
        root=workflow.root,
    )
    assert projector.weights_job("merv_tiny") == path
    frames = Workflow(
        edited(
            lambda c: c["models"]["merv_tiny"].update(overrides={"model": {"encoders": {"vit": {"num_frames": 8}}}})
        ),
        root=workflow.root,
    )
    assert frames.weights_job("merv_tiny") != path


def test_pretrain_job_and_the_recorded_architecture(workflow):
    job = json.loads((workflow.root / workflow.pretrain_job("appearance")).read_text())
    assert job == CONFIG["pretrain"]["appearance"], "the entry, as merv pretrain reads it"
    assert re.fullmatch(r"[0-9a-f]{16}", workflow.pretrain_architecture("appearance"))
    assert workflow.pretrain_architecture("appearance") != workflow.pretrain_architecture("motion")


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def test_reported_models_run_under_every_report_seed_others_under_their_own(workflow):
    assert workflow.seeds("merv_tiny") == (0, 1, 2) and workflow.seeds("merv_full") == (0,)
    assert workflow.seed_results("tiny_motion") == [f"results/tiny_motion/seed-{s}/eval.json" for s in (0, 1, 2)]
    run = workflow.seed_run("merv_tiny", "2")
    base = workflow.runs["merv_tiny"]
    assert run.train.seed == base.train.seed + 2 and run.model == base.model, "the seed moves training only"
    with pytest.raises(ValueError, match=r"runs under seeds \[0\], not 1"):
        workflow.seed_run("merv_full", 1)
    with pytest.raises(ValueError, match="distinct seeds"):
        Workflow(edited(lambda c: c["report"].update(seeds=[0, 0])))


def test_stage_inputs_chain_the_same_seed_and_share_the_feature_caches(workflow):
    align = workflow.stage_inputs("merv_tiny", "1", "align")
    finetune = workflow.stage_inputs("merv_tiny", "1", "finetune")
    assert "init" not in align and finetune["init"] == "results/merv_tiny/seed-1/train/align"
    assert finetune["data"] == "data/shards/small/train/finetune"
    assert finetune["features"] and all(f.startswith("data/features/merv_tiny/finetune-") for f in finetune["features"])
    assert workflow.stage_inputs("merv_tiny", "0", "finetune")["features"] == finetune["features"], "one cache"
    flags = workflow.train_flags("merv_tiny", "1", "finetune")
    assert flags.startswith("--init results/merv_tiny/seed-1/train/align --features ")
    assert workflow.final_checkpoint("merv_tiny", 2) == "results/merv_tiny/seed-2/train/finetune"
    with pytest.raises(ValueError, match="has no stage 'pretrain'"):
        workflow.previous_stage("merv_tiny", "pretrain")


# ---------------------------------------------------------------------------------------------------------------
# Feature caches


def test_a_cache_name_changes_with_its_encoder_only(workflow):
    name = workflow.cache_name("merv_tiny", "align", "vivit")
    assert name.startswith("align-vivit-") and workflow.cache_name("merv_tiny", "align", "vit") != name
    vit_frames = Workflow(
        edited(lambda c: c["models"]["merv_tiny"].update(overrides={"model": {"encoders": {"vit": {"num_frames": 8}}}}))
    )
    assert vit_frames.cache_name("merv_tiny", "align", "vivit") == name, "another encoder's frames keep the cache"
    assert vit_frames.cache_name("merv_tiny", "align", "vit") != workflow.cache_name("merv_tiny", "align", "vit")
    fmt = Workflow(edited(lambda c: c["shards"].update(frame_format="png")))
    assert fmt.cache_name("merv_tiny", "align", "vivit") != name
    scaled = Workflow(edited(lambda c: c["shards"].update(scale_in_decoder=True)))
    assert scaled.cache_name("merv_tiny", "align", "vivit") != name, "other frames, another cache"
    off = Workflow(edited(lambda c: c["shards"].update(scale_in_decoder=False)))
    assert off.cache_name("merv_tiny", "align", "vivit") == name
    assert workflow.feature_cache("merv_tiny", name) == {"split": "align", "encoder": "vivit"}
    with pytest.raises(ValueError, match="caches no features as 'nope'"):
        workflow.feature_cache("merv_tiny", "nope")


def test_feature_weights_count_a_pretrained_encoder_by_time(workflow):
    name = workflow.cache_name("merv_tiny", "align", "vivit")  # vivit: the pretrained motion encoder
    weights = dict(workflow.feature_weights("merv_tiny", name))
    assert weights == {"data/weights/merv_tiny/built": True, "data/weights/pretrained/appearance": True,
                       "data/weights/pretrained/motion": False}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Options


def test_options_follow_the_config(workflow):
    assert workflow.compute_flags == "--threads 1 --isa native" and workflow.threads == 1
    assert workflow.launch_flags("merv_tiny", "1") == "" and workflow.train_gpus() == 0
    slurm = Workflow(edited(lambda c: c["launch"].update(launcher="slurm", nodes=2, gpus_per_node=8, account="a b")))
    flags = slurm.launch_flags("merv_tiny", "1")
    assert "--launcher slurm --nodes 2" in flags and "--submitit-dir results/merv_tiny/seed-1/submitit" in flags
    assert slurm.train_gpus() == 0, "the submitted job holds the GPUs"
    local = Workflow(edited(lambda c: c["launch"].update(launcher="local", gpus_per_node=4)))
    assert local.train_gpus() == 4
    judge = Workflow(edited(lambda c: c["eval"]["judge"].update(url="http://h:1/v1", model="a judge")))
    assert "--judge-url http://h:1/v1 --judge-model 'a judge'" in judge.eval_options()
    assert "--limit" not in workflow.eval_options()
    assert "--limit 50" in Workflow(edited(lambda c: c["eval"].update(limit=50))).eval_options()
    assert workflow.shard_settings("paper") == {
        "frames": "16 32",
        "size": 224,
        "options": "--shard-size 64MB --frame-format jpg --backend decord --strict",
    }
    lax = Workflow(edited(lambda c: c["shards"].update(strict=False, target_size="1GB")))
    assert lax.shard_settings("small")["options"] == "--shard-size 1GB --frame-format jpg --backend decord --no-strict"
    scaled = Workflow(edited(lambda c: c["shards"].update(scale_in_decoder=True)))
    assert scaled.shard_settings("small")["options"].endswith("--strict --scale-in-decoder")


def test_all_shards_are_the_selected_models_shard_folders(workflow):
    shards = workflow.all_shards()
    assert "data/shards/small/train/align" in shards and "data/shards/small/eval/synth_mcq" in shards
    assert not any("/paper/" in s for s in shards), "merv_full is not selected"


def test_report_job_lists_every_seed_of_every_reported_model(workflow):
    spec = json.loads((workflow.root / workflow.report_job()).read_text())
    tiny = next(m for m in spec["models"] if m["name"] == "merv_tiny")
    assert [r["seed"] for r in tiny["runs"]] == [0, 1, 2]
    assert tiny["runs"][1] == {"seed": 1, "results": "results/merv_tiny/seed-1/eval.json",
                               "checkpoint": "results/merv_tiny/seed-1/train/finetune"}  # fmt: skip
    inputs = workflow.report_inputs()
    assert "results/tiny_motion/seed-2/eval/synth_open.json" in inputs["rows"]
    assert len(inputs["checkpoints"]) == 3 * len(workflow.reported)


# ---------------------------------------------------------------------------------------------------------------
# dvc.yaml


def test_the_committed_dvc_yaml_is_what_the_config_makes():
    res = subprocess.run([sys.executable, "-m", "merv", "dvc-yaml", "--check"], cwd=REPO, capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (REPO / "dvc.yaml").read_text() == Workflow(CONFIG).dvc_yaml()


def test_dvc_yaml_trains_every_selected_model_and_seed_in_one_stage(workflow):
    stages = yaml.safe_load(workflow.dvc_yaml())["stages"]
    models = CONFIG["pipeline"]["models"]
    assert list(stages) == ["synth", "shards", "models", "tables"]
    stage = stages["models"]
    targets = stage["cmd"].split(" -- ")[1].split()
    assert targets == [f"data/weights/pretrained/{p}" for p in sorted(CONFIG["pretrain"])] + [
        f"results/{m}/eval.json" for m in models
    ]
    outs = [next(iter(o)) for o in stage["outs"]]
    for m in models:
        assert {f"data/weights/{m}", f"data/features/{m}"} <= set(outs)
        assert {f"results/{m}/seed-{s}/{d}" for s in (0, 1, 2) for d in ("train", "eval")} <= set(outs)
    params = stage["params"][0]["config/config.yaml"]
    assert {f"models.{m}" for m in models} | {"pretrain", "compute", "eval", "report.seeds"} == set(params)
    assert "results/tiny_motion/seed-2/eval.json" in stage["metrics"]
    assert "results/tiny_motion/seed-2/eval" in stages["tables"]["deps"]
    fewer = Workflow(edited(lambda c: c["report"].update(seeds=[0])))
    outs = [next(iter(o)) for o in yaml.safe_load(fewer.dvc_yaml())["stages"]["models"]["outs"]]
    assert [o for o in outs if o.startswith("results/merv_tiny/")] == [
        "results/merv_tiny/seed-0/train",
        "results/merv_tiny/seed-0/eval",
    ]


def test_dvc_yaml_check_names_a_stale_file(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    res = subprocess.run([sys.executable, "-m", "merv", "dvc-yaml", "--check", "--out", str(tmp_path / "dvc.yaml"),
                          "--configfile", str(REPO / "config/config.yaml")], cwd=REPO, capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode != 0 and "is not what `merv dvc-yaml` makes" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------------------------
# The rules, through a real Snakemake dry run


@pytest.mark.slow  # a real Snakemake dry run of the whole default DAG
def test_no_job_command_line_carries_a_json_blob(tmp_path):
    write_config(tmp_path, CONFIG)
    res = snakemake(tmp_path, "-n", "-p", "--forceall", "all", "results/merv_full/eval.json", "results/probe/probe.md")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    commands = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Shell command: ")]
    assert len(commands) > 50 and any(c.startswith("merv train --config .merv/jobs/train-") for c in commands)
    assert not [c for c in commands if "{" in c], "a JSON blob on a command line"
    assert all(len(c) < 600 for c in commands), max(commands, key=len)
