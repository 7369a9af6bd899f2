"""Weights: looked up under $MERV_WEIGHTS then the working directory, fetched when missing (never offline), built
locally as stand-ins in the configured shape."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merv.config import resolve_run_config
from merv.fetch import (
    MissingWeightsError,
    build_local_weights,
    fetch_weights,
    weight_parts,
    with_local_weights,
)
from merv.models.merv import MERV
from tests.hub import LocalHub

TOY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def toy_merv_full():
    """merv-full at the miniature's size: the paper's four encoder families and a Llama, tiny."""
    return resolve_run_config(
        "merv-full",
        {"model": {"encoders": {"dinov2": {"image_size": 56, "num_frames": 4, "model_kwargs": {"img_size": 56, **TOY}},
                                "siglip": {"image_size": 64, "num_frames": 4, "model_kwargs": {"img_size": 64, **TOY}},
                                "languagebind": {"image_size": 56, "num_frames": 4},
                                "vivit": {"image_size": 64, "num_frames": 8}},
                   "projector": {"temporal_tokens": 4, "tokens_per_frame": 16}, "fusion": {"attn_dim": None},
                   "llm": {"max_length": 256}}},
    )  # fmt: skip


def with_paths(run, root: Path):
    """``run`` with its relative weight paths made absolute under ``root`` (how the lookup resolves them)."""
    encoders = tuple(dataclasses.replace(e, weights=str(root / e.weights)) for e in run.model.encoders)
    llm = dataclasses.replace(run.model.llm, weights=str(root / run.model.llm.weights))
    return dataclasses.replace(run, model=dataclasses.replace(run.model, encoders=encoders, llm=llm))


def hub_repo_dir(part) -> str:
    """Where the local hub keeps a part's repository (timm's pretrained weights live in timm/<name>)."""
    scheme, name = part.source.split(":", 1)
    return f"timm/{name}" if scheme == "timm" else name


def pinned_to(run, hub: LocalHub, commits: dict[str, str] | None = None):
    """``run`` with each part's revision set to ``commits[part name]``, else to the commit ``hub`` holds for it (the
    preset's real pin when the hub has no such repository yet)."""
    commits = commits or {}
    for part in weight_parts(run):
        repo = hub.folder / hub_repo_dir(part)
        if part.name in commits or repo.is_dir():
            commit = commits.get(part.name) or hub.resolve(hub_repo_dir(part), "main")[0]
            field = {"revision": commit}
            if part.name == "llm":
                run = dataclasses.replace(run, model=dataclasses.replace(
                    run.model, llm=dataclasses.replace(run.model.llm, **field)))  # fmt: skip
            else:
                enc_id = part.name.split()[1]
                encoders = tuple(dataclasses.replace(e, **field) if e.id == enc_id else e for e in run.model.encoders)
                run = dataclasses.replace(run, model=dataclasses.replace(run.model, encoders=encoders))
    return run


def place(root: Path, run) -> None:
    """Put something that passes for each weight of ``run`` under ``root`` (a file, or a folder with config.json)."""
    for part in weight_parts(run):
        path = root / part.path
        if part.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")


def test_offline_fetch_lists_every_missing_weight_with_where_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MERV_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    run = resolve_run_config("merv-full")
    with pytest.raises(MissingWeightsError) as err:
        fetch_weights(run)
    message = str(err.value)
    assert message.startswith("5 of 5 weights of merv-full are missing")
    for part, source in [
        ("encoder languagebind: weights/LanguageBind_Video_merge", "hf:LanguageBind/LanguageBind_Video_merge"),
        ("encoder dinov2: weights/dinov2-vitl14-reg4/model.safetensors", "timm:vit_large_patch14_reg4_dinov2.lvd142m"),
        ("encoder vivit: weights/vivit-b-16x2-kinetics400", "hf:google/vivit-b-16x2-kinetics400"),
        ("encoder siglip: weights/siglip-vitb16-224/model.safetensors", "timm:vit_base_patch16_siglip_224.webli"),
        ("llm: weights/Llama-2-7b-hf", "hf:meta-llama/Llama-2-7b-hf"),
    ]:
        line = next(line for line in message.splitlines() if part in line)
        assert f"source {source}" in line and f"looked in {tmp_path}/" in line and "offline" in line


def test_weights_are_found_under_merv_weights_first_then_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = resolve_run_config("merv-full")
    shared, project = tmp_path / "shared", tmp_path / "project"
    place(project, run)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MERV_WEIGHTS", str(shared))
    records = fetch_weights(run)
    assert all(r["path"].startswith(str(project)) and not r["downloaded"] for r in records)
    place(shared, run)
    assert all(r["path"].startswith(str(shared)) for r in fetch_weights(run))


def test_only_the_missing_weights_are_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = resolve_run_config("merv-full")
    place(tmp_path, run)
    (tmp_path / "weights" / "vivit-b-16x2-kinetics400" / "config.json").unlink()  # an incomplete folder
    with pytest.raises(MissingWeightsError, match=r"^1 of 5 weights of merv-full are missing:\n  encoder vivit: "):
        fetch_weights(run, root=tmp_path)


def test_a_weight_without_a_source_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = resolve_run_config("merv-tiny")
    with pytest.raises(MissingWeightsError, match="encoder vit: .* no source is configured"):
        fetch_weights(run, root=tmp_path)


def test_a_malformed_source_is_a_config_error():
    with pytest.raises(ValueError, match="encoder 'dinov2': source must look like hf:<name> or timm:<name>"):
        resolve_run_config("dinov2-single", {"model": {"encoders": {"dinov2": {"source": "s3://bucket/dino"}}}})
    with pytest.raises(ValueError, match="llm: source must look like hf:<name>, got 'timm:x'"):
        resolve_run_config("merv-tiny", {"model": {"llm": {"source": "timm:x"}}})


def test_standins_are_built_in_the_configured_shape(tmp_path):
    run = toy_merv_full()
    run = with_local_weights(run, tmp_path / "built")
    written = build_local_weights(run, "standin")
    assert written[1] == tmp_path / "built" / "dinov2" / "model.safetensors" and written[1].is_file()
    assert json.loads((tmp_path / "built" / "llm" / "config.json").read_text())["model_type"] == "llama"
    # a timm encoder whose config does not carry the stand-in's dimensions would not load them: refused
    wrong = with_local_weights(resolve_run_config("siglip-single"), tmp_path / "wrong")
    with pytest.raises(ValueError, match="encoder 'siglip': its stand-in is built with model_kwargs"):
        build_local_weights(wrong, "standin")


def test_fetch_downloads_over_the_hub_protocol_into_the_lookup_path(tmp_path):
    """Against a local server speaking the hub's download protocol: hub repositories and timm weights are fetched
    into <root>/<weight path>, a repository the hub refuses is reported, a second fetch downloads only what is
    missing, and the model loads from what was fetched."""
    run = with_local_weights(toy_merv_full(), tmp_path / "hub-src")  # only to build the files the hub serves
    build_local_weights(run, "standin")
    hub = tmp_path / "hub"
    for part, built in zip(weight_parts(toy_merv_full()), weight_parts(run), strict=True):
        scheme, name = part.source.split(":", 1)
        repo = hub / (f"timm/{name}" if scheme == "timm" else name)  # timm's pretrained weights live in timm/<name>
        if scheme == "timm":
            repo.mkdir(parents=True)
            shutil.copy(built.path, repo / "model.safetensors")
        elif part.name != "llm":  # the LLM repository is missing at first (gated, say)
            shutil.copytree(built.path, repo)

    root, record = tmp_path / "root", tmp_path / "fetched.json"

    def command():  # each part pinned to the commit the local hub holds
        run = pinned_to(toy_merv_full(), LocalHub(hub))
        return [sys.executable, "-m", "merv.cli", "fetch-weights", json.dumps(run.to_dict()),
                "--root", str(root), "--record", str(record)]  # fmt: skip

    with LocalHub(hub) as url:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"))
        res = subprocess.run(command(), capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 1 and "1 of 5 weights of merv-full are missing" in res.stderr, res.stderr[-2000:]
        assert "llm: weights/Llama-2-7b-hf" in res.stderr and "download failed: RepositoryNotFoundError" in res.stderr
        assert not record.exists()
        shutil.copytree(tmp_path / "hub-src" / "llm", hub / "meta-llama" / "Llama-2-7b-hf")
        res = subprocess.run(command(), capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    fetched = {r["name"]: r for r in json.loads(record.read_text())["weights"]}
    assert [n for n, r in fetched.items() if r["downloaded"]] == ["llm"]  # the others were already there
    assert fetched["encoder dinov2"]["path"] == str(root / "weights/dinov2-vitl14-reg4/model.safetensors")

    # what was fetched is what the hub served, and the model builds from it
    from safetensors.torch import load_file

    served = load_file(str(hub / "timm/vit_large_patch14_reg4_dinov2.lvd142m/model.safetensors"))
    got = load_file(fetched["encoder dinov2"]["path"])
    assert served.keys() == got.keys() and all(torch.equal(served[k], got[k]) for k in served)
    model = MERV.from_config(with_paths(toy_merv_full(), root).model)
    with torch.no_grad():
        visual, _ = model.encode({n: torch.randn(1, e.num_frames, 3, e.image_size, e.image_size)
                                  for n, e in model.encoders.items()})  # fmt: skip
    assert visual.shape[:2] == (1, 4 * 16)


def test_fetch_downloads_the_pinned_commit_and_records_it_beside_the_weights(tmp_path):
    """The hub holds two commits of ViViT and of the DINOv2 timm weights, `main` the newer: the config pins the older
    ones, and those land, with the commit and every file's SHA-256 recorded beside them (and carried into evaluation
    manifests). Re-pinned, the weights are fetched again. A part its preset marks `unpinned` (SigLIP) is refused unless
    --allow-unpinned, which takes main's commit and records it. Before, fetch downloaded whatever main held and
    recorded no commit."""
    from merv.digests import DigestMemo, sha256_file
    from merv.eval.provenance import weights_provenance
    from merv.weights import weight_paths

    hub = tmp_path / "hub"
    built = {}
    for seed in (0, 1):  # two versions of every weight
        run = with_local_weights(toy_merv_full(), tmp_path / f"src{seed}")
        build_local_weights(run, "standin", seed=seed)
        built[seed] = {part.name: Path(part.path) for part in weight_parts(run)}
    old, new = "1" * 40, "2" * 40
    for part in weight_parts(toy_merv_full()):
        repo = hub / hub_repo_dir(part)
        if part.name in ("encoder vivit", "encoder dinov2"):
            for commit, seed in ((old, 0), (new, 1)):
                dest = repo / f"@{commit}"
                if part.is_file:
                    dest.mkdir(parents=True)
                    shutil.copy(built[seed][part.name], dest / "model.safetensors")
                else:
                    shutil.copytree(built[seed][part.name], dest)
            (repo / "@main").write_text(new)
        elif part.is_file:
            repo.mkdir(parents=True)
            shutil.copy(built[0][part.name], repo / "model.safetensors")
        else:
            shutil.copytree(built[0][part.name], repo)
    root, record = tmp_path / "root", tmp_path / "fetched.json"
    local = LocalHub(hub)

    def fetch(run, *flags):
        command = [sys.executable, "-m", "merv.cli", "fetch-weights", json.dumps(run.to_dict()), "--root", str(root),
                   "--record", str(record), *flags]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    pins = {"encoder vivit": old, "encoder dinov2": old}
    run = pinned_to(toy_merv_full(), local, pins)
    siglip = next(e for e in run.model.encoders if e.id == "siglip")
    assert siglip.revision != "unpinned"  # pinned_to pins it to the hub's commit; unpinned below
    with local as url:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"))
        res = fetch(run)
        assert res.returncode == 0, res.stderr[-3000:]
        vivit, dinov2 = root / "weights/vivit-b-16x2-kinetics400", root / "weights/dinov2-vitl14-reg4/model.safetensors"
        assert (vivit / "model.safetensors").read_bytes() == (
            built[0]["encoder vivit"] / "model.safetensors"
        ).read_bytes()
        from safetensors.torch import load_file

        served = load_file(str(built[0]["encoder dinov2"]))
        assert all(torch.equal(served[k], v) for k, v in load_file(str(dinov2)).items()), "the pinned commit's"
        beside = json.loads(Path(f"{vivit}.source.json").read_text())
        assert beside["commit"] == old and beside["pinned"] and beside["source"] == "hf:google/vivit-b-16x2-kinetics400"
        assert (
            beside["files"] == {f: sha256_file(vivit / f) for f in beside["files"]} and "config.json" in beside["files"]
        )
        assert json.loads(Path(f"{dinov2}.source.json").read_text())["files"] == {
            "model.safetensors": sha256_file(dinov2)
        }
        fetched = {r["name"]: r for r in json.loads(record.read_text())["weights"]}
        assert fetched["encoder vivit"]["commit"] == old and fetched["encoder dinov2"]["revision"] == old

        # the manifest of an evaluation carries what was fetched, and notices a file changed since
        cfg = weight_paths(with_paths(run, root).model)
        provenance = weights_provenance(cfg, DigestMemo(None))
        assert (
            provenance["encoder vivit"]["fetched"]["commit"] == old
            and provenance["encoder vivit"]["fetched"]["unchanged"]
        )
        (vivit / "config.json").write_text((vivit / "config.json").read_text() + " ")
        assert not weights_provenance(cfg, DigestMemo(None))["encoder vivit"]["fetched"]["unchanged"]

        # re-pinned to the newer commit: the present weights are another commit's, so they are fetched again
        res = fetch(pinned_to(toy_merv_full(), local, {"encoder vivit": new, "encoder dinov2": old}))
        assert res.returncode == 0, res.stderr[-3000:]
        assert (vivit / "model.safetensors").read_bytes() == (
            built[1]["encoder vivit"] / "model.safetensors"
        ).read_bytes()
        assert json.loads(Path(f"{vivit}.source.json").read_text())["commit"] == new

        # SigLIP as its preset has it: unpinned, refused; allowed, it records main's commit
        shutil.rmtree(root / "weights" / "siglip-vitb16-224")
        encoders = tuple(
            dataclasses.replace(e, revision="unpinned") if e.id == "siglip" else e for e in run.model.encoders
        )
        unpinned = dataclasses.replace(run, model=dataclasses.replace(run.model, encoders=encoders))
        res = fetch(unpinned)
        assert res.returncode == 1 and "encoder siglip" in res.stderr, res.stderr[-2000:]
        assert "unpinned (revision unpinned): set model.encoders.siglip.revision to a hub commit sha" in res.stderr
        res = fetch(unpinned, "--allow-unpinned")
        assert res.returncode == 0, res.stderr[-3000:]
        beside = json.loads((root / "weights/siglip-vitb16-224/model.safetensors.source.json").read_text())
        assert beside["commit"] == siglip.revision and not beside["pinned"] and beside["revision"] == "unpinned"
    assert any("/revision/main" in r or r.endswith("vit_base_patch16_siglip_224.webli") for r in local.requests)


def test_every_paper_weight_is_pinned_or_says_it_is_not():
    """Each paper preset names, for every part with a source, a 40-hex hub commit or (SigLIP and Hiera: none found)
    `unpinned`."""
    import re

    from merv.config import available_presets, resolve_run_config

    for name in available_presets():
        for part in weight_parts(resolve_run_config(name)):
            if part.source is None:
                continue
            assert part.revision == "unpinned" or re.fullmatch(r"[0-9a-f]{40}", part.revision or ""), (name, part)
            unpinned = part.name in ("encoder siglip", "encoder hiera")
            assert (part.revision == "unpinned") == unpinned, (name, part.name)
    with pytest.raises(ValueError, match="revision must be a full 40-hex commit sha or 'unpinned', got 'main'"):
        resolve_run_config("vivit-single", {"model": {"encoders": {"vivit": {"revision": "main"}}}})
