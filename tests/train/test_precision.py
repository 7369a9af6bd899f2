"""Precision is the config's decision, never the LLM folder's: stage 2 on an LLM folder marked float16, as
Llama-2-7b-hf's is, holds fp32 master weights and fp32 optimizer state, makes updates of lr 2e-5, and saves its
checkpoint in the configured dtype; with encoders on the fly and from a feature cache."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merv.config import resolve_run_config
from merv.data.shards import iter_samples
from merv.features.extract import ExtractSettings, extract_features
from merv.train.loop import Preempted, train_stage
from merv.weights import resolve_model
from tests.conftest import tiny_overrides

STAGE = {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "num_workers": 0, "lr": 2.0e-5}


def llm_copy(tiny_run, dest: Path, dtype: torch.dtype) -> Path:
    """The tiny LLM re-saved by transformers in ``dtype``: its config.json is marked with it, as hub folders are."""
    from transformers import AutoModelForCausalLM

    src = Path(tiny_run.model.llm.weights)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def fp16_llm(tiny_run, tmp_path_factory) -> Path:
    folder = llm_copy(tiny_run, tmp_path_factory.mktemp("fp16") / "llm", torch.float16)
    config = json.loads((folder / "config.json").read_text())
    assert "float16" in (config.get("dtype"), config.get("torch_dtype"))
    assert {t.dtype for t in load_file(str(folder / "model.safetensors")).values()} == {torch.float16}
    return folder


def stage2_run(tiny_run, llm: Path, **train):
    overrides = tiny_overrides(Path(tiny_run.model.llm.weights).parent)
    overrides["model"]["llm"]["weights"] = str(llm)
    overrides["train"] = {"stages": {"finetune": STAGE}, **train}
    return resolve_run_config("merv-tiny", overrides)


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{path}: not strict JSON ({name})")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def training_state(folder: Path) -> dict:
    """The DCP state of a ``<out>.work/step-*`` folder as one flat dict of tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "dcp", folder / "state.pt")
    return torch.load(folder / "state.pt", weights_only=True)


def tensors(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensors(v, f"{prefix}{k}.")
    elif torch.is_tensor(tree):
        yield prefix[:-1], tree


def test_stage2_on_an_llm_folder_marked_float16_keeps_fp32_masters(tiny_run, fp16_llm, shards, tmp_path):
    """Stopped after step 1, the training state holds fp32 weights and AdamW moments, and every trained tensor moved
    (the LLM's norm weights, at 1.0, too: an update of 2e-5 is below half an fp16 step there, 4.9e-4); resumed to the
    end, the checkpoint is fp32 as configured and meta.json says what was held and computed in which dtype."""
    run = stage2_run(tiny_run, fp16_llm)
    out = tmp_path / "ft"
    with pytest.raises(Preempted):
        train_stage(run, "finetune", shards["finetune"], out, progress=False, stop=lambda: True)
    state = dict(tensors(training_state(out.with_name("ft.work") / "step-00000001")))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    moments = {k: v for k, v in state.items() if k.startswith("optim.state.")}
    # (integer buffers, e.g. a batch norm's count in a frozen encoder, are not weights)
    assert weights and {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}, "fp32 masters"
    # the trained groups, and of the frozen encoders only buffers (the conv stem's batch-norm statistics)
    frozen = [k for k in weights if k.startswith("encoders.")]
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in frozen), frozen
    assert {k.split(".")[0] for k in weights} - {"encoders"} == {"projectors", "fusion", "llm"}
    assert moments and {v.dtype for v in moments.values()} == {torch.float32}, "fp32 optimizer state"
    initial = {f"llm.{k}": v.float() for k, v in load_file(str(fp16_llm / "model.safetensors")).items()}
    norms = [k for k in weights if k.startswith("llm.") and "norm" in k]
    assert norms and all(torch.all(initial[k] == 1.0) for k in norms)
    unchanged = [k for k in weights if k in initial and torch.equal(weights[k], initial[k])]
    assert not unchanged, f"an update of lr 2e-5 left these weights unchanged: {unchanged}"
    step = max((weights[k] - initial[k]).abs().max().item() for k in norms)
    assert 1e-5 < step < 4e-5, f"the norm weights moved by {step}, not by about the learning rate"

    meta = train_stage(run, "finetune", shards["finetune"], out, progress=False)  # resumes, ends
    saved = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert meta["precision"] == {"weights": "fp32", "trained_weights": "fp32", "optimizer_state": "fp32",
                                 "checkpoint": "fp32", "compute": "fp32"}  # fmt: skip
    assert json.loads((out / "meta.json").read_text())["precision"] == meta["precision"]
    records = strict_json_lines(out / "metrics.jsonl")
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_stage2_from_bf16_features_on_an_llm_folder_marked_float16(tiny_run, fp16_llm, shards, tmp_path):
    """Cached features stored in bf16, an fp32 projector, an LLM folder marked float16: each boundary casts to the
    weights it meets; the checkpoint is stored in bf16 as configured."""
    model = resolve_model(tiny_run.model)
    caches = {}
    for enc in model.encoders:
        caches[enc.id] = tmp_path / "features" / enc.id
        extract_features(shards["finetune"], model, enc.id, caches[enc.id], ExtractSettings(dtype="bf16"))
    run = stage2_run(tiny_run, fp16_llm, features="cached", feature_dtype="bf16", checkpoint_dtype="bf16")
    meta = train_stage(run, "finetune", shards["finetune"], tmp_path / "ft", progress=False, features=caches)
    assert set(meta["data"]["feature_caches"]) == {"vit", "vivit"} and meta["step"] == 3
    saved = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert meta["precision"]["checkpoint"] == "bf16" and meta["precision"]["trained_weights"] == "fp32"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in strict_json_lines(tmp_path / "ft" / "metrics.jsonl"))


@pytest.mark.parametrize("launcher", ["none", "local"])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_samples(tiny_run, shards, tmp_path, launcher):
    """An LLM with one huge (finite, so it loads) weight in its final norm: step 1's logits overflow and its loss is
    not finite. `merv train` exits 1 with the step
    and the step's sample ids, no traceback, and writes no checkpoint; also when the step ran in a submitit job."""
    llm = llm_copy(tiny_run, tmp_path / "llm", torch.float32)
    state = load_file(str(llm / "model.safetensors"))
    state["model.norm.weight"][0] = 3e38
    save_file(state, str(llm / "model.safetensors"), metadata={"format": "pt"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(stage2_run(tiny_run, llm).to_dict()))
    cmd = [sys.executable, "-m", "merv.cli", "train", "--config", str(config), "--stage", "finetune", "--data",
           str(shards["finetune"]), "--out", str(tmp_path / "out"), "--no-progress", "--launcher", launcher,
           "--submitit-dir", str(tmp_path / "submitit")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    error = "merv train: error: " + ("" if launcher == "none" else "local job ")
    assert error in res.stderr and "step 1: loss nan" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    keys = json.loads(re.search(r"the step's samples: (\[[^\]]*\])", res.stderr)[1].replace("'", '"'))
    assert len(keys) == 4 and set(keys) <= {s["meta"]["key"] for s in iter_samples(shards["finetune"])}
    assert not (tmp_path / "out").exists()


def test_the_folder_never_decides_the_dtype_inference_asks_for_one(tiny_run, fp16_llm, tmp_path):
    """Built from a float16-marked LLM folder: held in the config's fp32; a checkpoint loaded for inference with
    ``--dtype bf16``/``fp16`` is held in that dtype throughout (the LLM loaded in it, not cast from fp32 after)."""
    from merv.api import load_vid
    from merv.checkpoint import save_checkpoint
    from merv.models.merv import MERV

    run = stage2_run(tiny_run, fp16_llm)
    model = MERV.from_config(run.model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    save_checkpoint(model, run, tmp_path / "ckpt", {"trained_groups": ["projectors", "fusion"]})
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        loaded = load_vid(tmp_path / "ckpt", device="cpu", dtype=name)
        assert {p.dtype for p in loaded.parameters()} == {dtype}, name
        assert torch.equal(loaded.projectors["vit"].head.weight, model.projectors["vit"].head.weight.to(dtype))
