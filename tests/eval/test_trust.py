"""Evaluation numbers belong to the model they name: the answer cache is keyed by everything that can change an
answer (every weight file, the checkpoint's own config, the question), cached values are checked before use, and a
broken checkpoint or a non-finite score stops the evaluation with a clear error instead of a number."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from merv.checkpoint import save_checkpoint
from merv.cli import main
from merv.config import resolve_run_config
from merv.eval.benchmark import CheckpointHandle, EvalSettings, evaluate
from merv.eval.cache import ResultCache
from merv.models.merv import MERV
from merv.weights import ENV
from merv.weights import project_record as record


@pytest.fixture(scope="module")
def project(tiny_run, tmp_path_factory):
    """A project folder with merv-tiny's weights at the preset's relative paths and a checkpoint trained in it, the
    way `snakemake` leaves them (relative weight paths are found under $MERV_WEIGHTS first, then the project)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(Path(tiny_run.model.llm.weights).parent, root / "data" / "weights" / "merv-tiny")
    run = resolve_run_config("merv-tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv(ENV, raising=False)
        torch.manual_seed(0)
        model = MERV.from_config(run.model)
        ckpt = root / "results" / "merv_tiny" / "finetune"
        meta = {"stage": "finetune", "step": 1, "trained_groups": ["fusion", "projectors"],
                "config_fingerprint": run.fingerprint(), "project": record(ckpt)}  # fmt: skip
        save_checkpoint(model, run, ckpt, meta)
    return root, ckpt


@pytest.fixture
def ckpt(project, tmp_path, monkeypatch):
    """A fresh copy of the project's checkpoint (tests damage it), evaluated from outside the project."""
    root, original = project
    copy = tmp_path / "finetune"
    shutil.copytree(original, copy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    meta = json.loads((copy / "meta.json").read_text())
    meta["project"] = {"absolute": str(root)}  # the copy was trained in the project too
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def run_eval(checkpoint: Path, shards, cache_dir: Path, batch_size: int = 6) -> tuple[dict, CheckpointHandle]:
    handle = CheckpointHandle(checkpoint)
    cache = ResultCache(cache_dir)
    try:
        return evaluate(handle, shards["synth_mcq"], "synth_mcq", EvalSettings(batch_size=batch_size), cache), handle
    finally:
        cache.close()


def test_swapping_an_encoders_weights_through_merv_weights_misses_the_cache(ckpt, shards, project, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    from merv.models.tiny import init_encoder, save_encoder

    first, _ = run_eval(ckpt, shards, tmp_path / "cache")
    assert first["run"]["answered_by_model"] == 6
    # another vit, found first under $MERV_WEIGHTS (the other weights still come from the project)
    run = resolve_run_config("merv-tiny")
    vit = run.model.encoders[0]
    torch.manual_seed(123)
    save_encoder(vit, init_encoder(vit), tmp_path / "other" / vit.weights)
    monkeypatch.setenv(ENV, str(tmp_path / "other"))
    second, handle = run_eval(ckpt, shards, tmp_path / "cache")
    assert second["run"]["answered_by_model"] == 6 and handle.loads == 1, "the other encoder answered"
    assert second["manifest"]["checkpoint"] != first["manifest"]["checkpoint"]
    monkeypatch.delenv(ENV)
    third, handle = run_eval(ckpt, shards, tmp_path / "cache")
    assert third["run"]["answered_by_model"] == 0 and handle.loads == 0, "the original weights: all from the cache"


def test_an_edited_checkpoint_config_is_refused_naming_the_field(ckpt, shards, tmp_path):
    run_eval(ckpt, shards, tmp_path / "cache")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["projector"]["tokens_per_frame"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    message = r"config\.json.*model\.projector\.tokens_per_frame is 4, the weights were trained with 16"
    with pytest.raises(ValueError, match=message):
        run_eval(ckpt, shards, tmp_path / "cache")


def test_without_a_record_of_the_training_config_the_config_is_part_of_the_key(ckpt, shards, tmp_path, caplog):
    """A checkpoint that records no training config (written before merv recorded it) is read as it is, with a
    warning; its config as read from config.json is in the cache key, so an edit recomputes every answer."""
    first, _ = run_eval(ckpt, shards, tmp_path / "cache")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.pop("trained_config", None)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["projector"]["tokens_per_frame"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    second, handle = run_eval(ckpt, shards, tmp_path / "cache")
    assert second["run"]["answered_by_model"] == 6 and handle.loads == 1
    assert second["config_fingerprint"] != first["config_fingerprint"]


def _records(cache_dir: Path) -> list[tuple[Path, int, dict]]:
    out = []
    for path in sorted(cache_dir.glob("*.jsonl")):
        for i, line in enumerate(path.read_text().splitlines()):
            out.append((path, i, json.loads(line)))
    return out


def _rewrite(path: Path, index: int, record: dict) -> None:
    lines = path.read_text().splitlines()
    lines[index] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def test_an_edited_cache_value_is_not_trusted(ckpt, shards, tmp_path, caplog):
    """The issue's edit: one cached answer changed to the right option letter, still valid JSON. Before, it was
    reused and raised the accuracy; now the record no longer matches its own digest, so it is recomputed."""
    first, _ = run_eval(ckpt, shards, tmp_path / "cache")
    wrong = next(r for r in first["rows"] if not r["correct_generate"])
    for path, i, rec in _records(tmp_path / "cache"):
        if rec["v"].get("prediction") == wrong["prediction"]:
            _rewrite(path, i, {**rec, "v": {"prediction": wrong["answer"]}})
    second, handle = run_eval(ckpt, shards, tmp_path / "cache")
    assert second["summary"] == first["summary"], "the edited answer did not move the accuracy"
    assert second["run"]["answered_by_model"] >= 1 and handle.loads == 1
    assert "record(s) do not match their digest" in caplog.text


def test_a_malformed_cache_value_is_recomputed_with_a_warning(ckpt, shards, tmp_path, caplog):
    """Records with a valid digest but a value of the wrong shape (another writer's bug, an old format): before,
    ``{}`` crashed with KeyError 'prediction'. One question a batch, so that a recomputed answer is the same as the
    first one (generation depends on the batch's padding)."""
    first, _ = run_eval(ckpt, shards, tmp_path / "pristine", batch_size=1)
    for n, bad in enumerate([{}, None, {"prediction": 3}, {"logprobs": "x", "greedy": []}, [1, 2]]):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        shutil.copytree(tmp_path / "pristine", tmp_path / "cache")
        records = _records(tmp_path / "cache")
        gen = next((path, i, r) for path, i, r in records if "prediction" in r["v"])
        scores = next((path, i, r) for path, i, r in records if "logprobs" in r["v"])
        for path, i, rec in (gen, scores):  # each replaced by the bad value, written as the cache writes records
            scratch = ResultCache(tmp_path / f"scratch{n}-{i}")
            scratch.put(rec["k"], bad)
            scratch.close()
            (line,) = [p.read_text() for p in (tmp_path / f"scratch{n}-{i}").glob("*.jsonl")]
            _rewrite(path, i, json.loads(line))
        caplog.clear()
        second, _ = run_eval(ckpt, shards, tmp_path / "cache", batch_size=1)
        assert second["rows"] == first["rows"] and second["run"]["answered_by_model"] >= 1, bad
        assert "malformed" in caplog.text, bad


# ------------------------------------------------------------------------------------------------------------------
# Broken checkpoints: a clear error naming the file and the tensor, never a number


def _edit_weights(ckpt: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    save_file(change(state), str(ckpt / "model.safetensors"))


def _eval_cli(ckpt: Path, shards, out: Path) -> int:
    return main(["eval", "--model", str(ckpt), "--data", str(shards["synth_mcq"]), "--name", "synth_mcq",
                 "--out", str(out), "--no-cache", "--batch-size", "6"])  # fmt: skip


HEAD = "projectors.vit.head.weight"


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])


DAMAGE = {
    "empty": (lambda c: _edit_weights(c, lambda s: {}), r"model\.safetensors.*missing.*fusion\."),
    "partial": (lambda c: _edit_weights(c, lambda s: {k: v for k, v in s.items() if k != HEAD}),
                rf"model\.safetensors.*missing.*{HEAD}"),
    "integer dtype": (lambda c: _edit_weights(c, lambda s: {**s, HEAD: s[HEAD].to(torch.int32)}),
                      rf"model\.safetensors.*{HEAD}.*I32"),
    "extra tensor": (lambda c: _edit_weights(c, lambda s: {**s, "projectors.vit.extra": torch.zeros(2)}),
                     r"model\.safetensors.*unexpected.*projectors\.vit\.extra"),
    "wrong shape": (lambda c: _edit_weights(c, lambda s: {**s, HEAD: s[HEAD][:, :3].contiguous()}),
                    rf"model\.safetensors.*{HEAD}.*shape"),
    "truncated": (_truncate, r"model\.safetensors.*truncated"),
    "nan weight": (lambda c: _edit_weights(c, lambda s: {**s, HEAD: s[HEAD].index_fill(0, torch.tensor(0), math.nan)}),
                   rf"model\.safetensors.*non-finite.*{HEAD}"),
    "edited config": (lambda c: c.joinpath("config.json").write_text(
        (c / "config.json").read_text().replace('"tokens_per_frame": 16', '"tokens_per_frame": 4')),
        r"config\.json.*tokens_per_frame"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_broken_checkpoint_is_an_error_naming_file_and_tensor(ckpt, shards, tmp_path, capsys, damage):
    change, message = DAMAGE[damage]
    change(ckpt)
    code = _eval_cli(ckpt, shards, tmp_path / "out.json")
    err = capsys.readouterr().err
    assert code == 1 and "merv eval: error:" in err, err[-2000:]
    assert __import__("re").search(message, err), err[-2000:]
    assert not (tmp_path / "out.json").exists()


def test_a_non_finite_score_stops_the_evaluation_naming_the_question(ckpt, shards, tmp_path, capsys):
    """Finite but huge weights overflow to inf, so every log-probability is NaN: before, option A was always picked
    and an accuracy was written with rc 0 (and eval.json held a bare NaN)."""
    _edit_weights(ckpt, lambda s: {**s, HEAD: s[HEAD] * 1e38})
    code = _eval_cli(ckpt, shards, tmp_path / "out.json")
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "question" in err and "eval_0" in err, err[-2000:]
    assert not (tmp_path / "out.json").exists()


def test_result_files_are_strict_json(tmp_path):
    from merv.cli import write_json

    with pytest.raises(ValueError, match="out.json"):
        write_json(tmp_path / "out.json", {"value": float("nan")})
    assert not (tmp_path / "out.json").exists()
