"""Strict, finite loading of weight files and folders (merv.integrity), and the digest memo (merv.digests)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merv.digests import DigestMemo, sha256_file
from merv.integrity import IntegrityError, load_verified, read_safetensors_header
from merv.models.merv import MERV


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 3), "b": torch.arange(5)}, str(path))
    return path


def test_headers_are_read_and_damage_is_named(tmp_path):
    path = _file(tmp_path)
    header = read_safetensors_header(path)
    assert (header["a"].dtype, header["a"].shape, header["b"].dtype) == ("F32", (4, 3), "I64")
    data = path.read_bytes()
    for damage, message in [
        (b"", "0 bytes, too short"),
        (data[:-7], "truncated: tensor"),
        (data + b"\0" * 8, "8 bytes after the last tensor"),
        (data[:12] + b"\xff" + data[13:], "damaged safetensors header"),
        ((10**12).to_bytes(8, "little") + data[8:], "header claims"),
    ]:
        path.write_bytes(damage)
        with pytest.raises(IntegrityError, match=message):
            read_safetensors_header(path)


def test_load_verified_checks_names_shapes_dtypes_and_values(tmp_path):
    path = _file(tmp_path)
    expected = {"a": ((4, 3), torch.float32), "b": ((5,), torch.int64)}
    assert set(load_verified(path, expected)) == {"a", "b"}
    with pytest.raises(IntegrityError, match=r"missing tensors c; unexpected tensors .* b"):
        load_verified(path, {"a": ((4, 3), torch.float32), "c": ((1,), torch.float32)})
    with pytest.raises(IntegrityError, match=r"tensor a: shape \[4, 3\] in the file, the model expects \[3, 4\]"):
        load_verified(path, {"a": ((3, 4), torch.float32), "b": ((5,), torch.int64)})
    with pytest.raises(IntegrityError, match=r"tensor b: dtype I64 in the file, the model expects a floating-point"):
        load_verified(path, {"a": ((4, 3), torch.float32), "b": ((5,), torch.float32)})
    save_file({"a": torch.ones(4, 3, dtype=torch.bfloat16), "b": torch.arange(5)}, str(path))
    assert load_verified(path, expected)["a"].dtype == torch.bfloat16, "a bf16 copy of fp32 weights is fine"
    save_file({"a": torch.tensor([[1.0, math.inf, 0.0]] * 4), "b": torch.arange(5)}, str(path))
    with pytest.raises(IntegrityError, match=r"non-finite \(NaN or inf\) weights in a \(4 of 12 values\)"):
        load_verified(path, expected)


def test_llm_and_encoder_folders_are_loaded_strictly(tiny_run, tmp_path):
    """A tensor missing from the LLM (transformers would initialise it randomly and say nothing that stops a run),
    a NaN in it, an integer tensor in the ViViT folder, a left-over tensor in the timm file: each is an error naming
    the weight, the file and the tensor."""
    weights = tmp_path / "weights"
    shutil.copytree(Path(tiny_run.model.llm.weights).parent, weights)
    from merv.config import resolve_run_config
    from tests.conftest import tiny_overrides

    run = resolve_run_config("merv-tiny", tiny_overrides(weights))
    llm = weights / "llm" / "model.safetensors"
    pristine = llm.read_bytes()
    state = load_file(str(llm))
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(llm))
    with pytest.raises(IntegrityError, match=rf"LLM weights .*missing tensors \(left randomly initialised\) {name}"):
        MERV.from_config(run.model)
    save_file({**state, name: state[name].index_fill(0, torch.tensor(0), math.nan)}, str(llm))
    with pytest.raises(IntegrityError, match=rf"LLM weights .*non-finite .* {name}"):
        MERV.from_config(run.model)
    llm.write_bytes(pristine)

    vivit = weights / "vivit" / "model.safetensors"
    state = load_file(str(vivit))
    key = "embeddings.patch_embeddings.projection.weight"
    save_file({**state, key: state[key].to(torch.int32)}, str(vivit))
    with pytest.raises(IntegrityError, match=rf"encoder 'vivit' .*tensor {key} in model.safetensors: dtype I32"):
        MERV.from_config(run.model)
    save_file(state, str(vivit))

    vit = weights / "vit" / "model.safetensors"
    state = load_file(str(vit))
    # (a classifier head is dropped, as timm adapts any hub checkpoint to num_classes=0; anything else is refused)
    save_file({**state, "blocks.0.extra": torch.zeros(3, 64)}, str(vit))
    with pytest.raises(IntegrityError, match=r"encoder 'vit': .*unexpected tensors .*blocks.0.extra"):
        MERV.from_config(run.model)
    save_file(state, str(vit))
    MERV.from_config(run.model)  # restored: loads


def test_the_memo_rereads_only_changed_files(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 1000)
    (folder / "b.bin").write_bytes(b"b" * 1000)
    (folder / ".hidden").write_bytes(b"x")
    memo = DigestMemo(tmp_path / "memo.json")
    first = memo.tree(folder)
    assert memo.read_bytes == 2000
    memo.save()
    again = DigestMemo(tmp_path / "memo.json")
    assert again.tree(folder) == first and again.read_bytes == 0, "unchanged files come from the memo"
    # rewritten in place to the same size, its mtime set back: the change time still tells
    st = (folder / "a.bin").stat()
    (folder / "a.bin").write_bytes(b"c" * 1000)
    os.utime(folder / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = DigestMemo(tmp_path / "memo.json")
    assert changed.tree(folder) != first and changed.read_bytes == 1000
    assert changed.files(folder) == {"a.bin": sha256_file(folder / "a.bin"), "b.bin": sha256_file(folder / "b.bin")}
    before = changed.tree(folder)
    (folder / "b.bin").rename(folder / "c.bin")
    assert DigestMemo(None).tree(folder) != before, "a renamed file changes the folder's digest"
