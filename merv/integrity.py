"""Strict, finite loading: a weight file must supply exactly the tensors a module expects, each with its shape and a
compatible dtype, and every value finite -- or the load is a clear error that names the file and the tensor.

A safetensors file is checked from its header first (names, dtypes, shapes and byte ranges, read without the data):
an empty file, a cut-off one, a header that does not cover the data, a missing or left-over tensor, a wrong shape or
an integer tensor where the module holds floats are all refused before a byte of data is used. The data is then
checked to be finite (a NaN weight makes every log-probability NaN, and multiple choice then always picks the first
option). Transformers folders are checked the same way through ``from_pretrained``'s loading report plus their
safetensors headers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names by kind
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
               "C64": 8}  # fmt: skip
MAX_HEADER = 100 * 2**20  # safetensors' own limit
SHOWN = 5  # names listed per kind of problem (the count is always given)


class IntegrityError(ValueError):
    """A weight file or folder that does not hold what the model expects."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: F32, BF16, I64, ...
    shape: tuple[int, ...]
    start: int  # byte range in the data section
    end: int


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``F32``)."""
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # fmt: skip
    return names.get(dtype, str(dtype))


def _list(names, limit: int = SHOWN) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header, after checking that the header is well formed and that
    the data section holds exactly the byte ranges it announces (so a truncated file is named as such)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: not a safetensors file: {size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise IntegrityError(
                    f"{path}: truncated or not a safetensors file: the header claims {length} bytes, the file has "
                    f"{size}"
                )
            raw = f.read(length)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: damaged safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: damaged safetensors header (not a JSON object)")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{path}: damaged safetensors header at tensor {name!r}") from None
        numel = math.prod(shape)
        if dtype in DTYPE_BYTES and end - start != numel * DTYPE_BYTES[dtype]:
            raise IntegrityError(f"{path}: tensor {name!r}: {end - start} bytes for {dtype} of shape {list(shape)}")
        if not 0 <= start <= end:
            raise IntegrityError(f"{path}: tensor {name!r}: bad byte range [{start}, {end})")
        if end > data_size:
            raise IntegrityError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data_size}"
            )
        tensors[name] = TensorInfo(dtype, shape, start, end)
    covered = max((t.end for t in tensors.values()), default=0)
    if covered != data_size:
        raise IntegrityError(f"{path}: {data_size - covered} bytes after the last tensor: not a valid safetensors file")
    return tensors


def expected_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of a state dict: what a file meant for it must hold."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _compatible(file_dtype: str, expected: torch.dtype) -> bool:
    """Floating weights may be stored in any floating dtype (a bf16 checkpoint of an fp32 model loads by casting);
    integer and boolean tensors (buffers such as position ids) need their own kind."""
    if expected.is_floating_point:
        return file_dtype in FLOAT_DTYPES
    return file_dtype == safetensors_dtype(expected)


def check_tensors(
    where: str,
    found: dict[str, tuple[tuple[int, ...], str]],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """Compare what a file holds (``{name: (shape, safetensors dtype)}``) with what is expected; raise one
    :class:`IntegrityError` listing every problem. Names starting with an ``allow_*`` prefix may be absent/extra."""
    missing = sorted(k for k in expected if k not in found and not k.startswith(allow_missing or ("\0",)))
    unexpected = sorted(k for k in found if k not in expected and not k.startswith(allow_unexpected or ("\0",)))
    problems = []
    if missing:
        problems.append(f"missing tensors {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (nothing in the model consumes them) {_list(unexpected)}")
    for name in sorted(set(found) & set(expected)):
        (shape, dtype), (want_shape, want_dtype) = found[name], expected[name]
        if tuple(shape) != tuple(want_shape):
            problems.append(f"tensor {name}: shape {list(shape)} in the file, the model expects {list(want_shape)}")
        elif not _compatible(dtype, want_dtype):
            kind = "a floating-point dtype" if want_dtype.is_floating_point else safetensors_dtype(want_dtype)
            problems.append(f"tensor {name}: dtype {dtype} in the file, the model expects {kind}")
    if problems:
        raise IntegrityError(f"{where}: " + "; ".join(problems))


def check_finite(tensors, where: str) -> None:
    """Every floating value of ``tensors`` (``{name: tensor}`` or ``(name, tensor)`` pairs) is finite, or an error
    naming ``where``, the first tensors with NaN/inf and how many values. Meta tensors (shapes only) hold no values."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    bad = []
    for name, t in items:
        if t.is_floating_point() and t.numel() and not t.is_meta:
            count = int((~torch.isfinite(t)).sum())
            if count:
                bad.append(f"{name} ({count} of {t.numel()} values)")
    if bad:
        raise IntegrityError(f"{where}: non-finite (NaN or inf) weights in {_list(bad)}")


def check_header(
    path: str | Path,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    *,
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """A safetensors file's header (read before any data): intact, and matching ``expected`` names, shapes and dtypes
    (None: any names and shapes, but floating or integer data only)."""
    path = Path(path)
    header = read_safetensors_header(path)
    found = {k: (t.shape, t.dtype) for k, t in header.items()}
    if expected is not None:
        check_tensors(str(path), found, expected, allow_unexpected=allow_unexpected)
    else:
        odd = [f"{k} ({t.dtype})" for k, t in header.items() if t.dtype not in DTYPE_BYTES or t.dtype == "C64"]
        if odd:
            raise IntegrityError(f"{path}: tensors of a dtype weights cannot have: {_list(odd)}")


def check_names(path: str | Path, names: set[str], what: str, *, allow_unexpected: tuple[str, ...] = ()) -> None:
    """The tensors of a safetensors file are exactly ``names`` (less those starting with ``allow_unexpected``)."""
    found = set(read_safetensors_header(path))
    missing = sorted(names - found)
    unexpected = sorted(k for k in found - names if not k.startswith(allow_unexpected or ("\0",)))
    problems = []
    if missing:
        problems.append(f"missing tensors (left randomly initialised) {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (nothing in the model consumes them) {_list(unexpected)}")
    if problems:
        raise IntegrityError(f"{what}: {path}: " + "; ".join(problems))


def load_verified(
    path: str | Path,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None,
    *,
    allow_unexpected: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, after its header matched ``expected`` (None: any names and shapes, but floating
    or integer data only) and its values proved finite."""
    from safetensors.torch import load_file

    path = Path(path)
    check_header(path, expected, allow_unexpected=allow_unexpected)
    try:
        state = load_file(str(path))
    except Exception as e:  # the header was fine, so this is damage the header check cannot see
        raise IntegrityError(f"{path}: cannot read the tensors ({type(e).__name__}: {e})") from None
    check_finite(state, str(path))
    return state


def folder_safetensors(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """``{tensor: (shape, dtype, file)}`` over a transformers folder's ``*.safetensors`` files (headers only)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, t in read_safetensors_header(file).items():
            out[name] = (t.shape, t.dtype, file)
    return out


def check_pretrained(
    model: torch.nn.Module,
    info: dict,
    folder: str | Path,
    what: str,
    *,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """After ``from_pretrained(folder, output_loading_info=True)``: nothing missing (transformers would have left it
    randomly initialised), nothing unconsumed, no shape mismatch, no integer data for float weights, all finite.
    ``allow_*``: name prefixes a model may lack or leave (e.g. a classifier head of a backbone checkpoint)."""
    folder = Path(folder)
    problems = []
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(allow_missing or ("\0",))]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allow_unexpected or ("\0",))]
    mismatched = [f"{k[0]} {list(k[1])} vs {list(k[2])}" if isinstance(k, tuple) and len(k) == 3 else str(k)
                  for k in info.get("mismatched_keys", [])]  # fmt: skip
    if missing:
        problems.append(f"missing tensors (left randomly initialised) {_list(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors (nothing in the model consumes them) {_list(sorted(unexpected))}")
    if mismatched:
        problems.append(f"tensors of another shape (file vs model) {_list(mismatched)}")
    for msg in info.get("error_msgs", []) or []:
        problems.append(str(msg).splitlines()[0])
    state = model.state_dict()
    for name, (_, dtype, file) in folder_safetensors(folder).items():
        if name in state and state[name].is_floating_point() and dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name} in {file.name}: dtype {dtype}, the model expects a floating-point dtype")
    if problems:
        raise IntegrityError(f"{what} ({folder}): " + "; ".join(problems))
    check_finite(state, f"{what} ({folder})")


# ------------------------------------------------------------------------------------------------------------------
# A checkpoint's config.json against the config its weights were trained with

# Where weights come from may change after training (another machine, another weights folder): their content is
# digested into every evaluation's cache key instead. Everything else shapes what the stored weights compute.
LOCATION_FIELDS = ("weights", "source", "revision")


def _flatten(value, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
        out = {f"{prefix}.ids": [v["id"] for v in value]}
        for v in value:
            out |= _flatten({k: x for k, x in v.items() if k != "id"}, f"{prefix}[{v['id']}]")
        return out
    return {prefix: value}


def model_config_differences(now: dict, trained: dict) -> list[str]:
    """``field: now X, trained with Y`` for every model field that differs, where weights are found excepted."""
    a, b = _flatten(now, "model"), _flatten(trained, "model")
    out = []
    for key in sorted(set(a) | set(b)):
        if key.rsplit(".", 1)[-1] in LOCATION_FIELDS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key} is {a.get(key, '<absent>')!r}, the weights were trained with {b.get(key, '<absent>')!r}")
    return out


def check_checkpoint_config(folder: str | Path, config: dict, meta: dict) -> bool:
    """The model section of a checkpoint's ``config.json`` is the one its weights were trained with (recorded in
    ``meta.json`` by :func:`merv.checkpoint.save_checkpoint`), where weights are found excepted; else an error naming
    each field. Returns False when the checkpoint records no training config (written by an older merv)."""
    trained = meta.get("trained_config")
    if trained is None:
        return False
    diffs = model_config_differences(config.get("model", {}), trained.get("model", {}))
    if diffs:
        raise IntegrityError(
            f"{Path(folder) / 'config.json'} was changed after the checkpoint was written: {'; '.join(diffs)}. The "
            "stored weights fit the recorded config (meta.json trained_config): restore it; only where weights are "
            "found (weights, source, revision) may change"
        )
    return True
