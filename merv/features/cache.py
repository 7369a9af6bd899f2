"""The frozen-encoder feature cache: what a cache entry is, its content key, and the checks before it is read.

A cache is a folder of WebDataset shards for one encoder over one shard folder: per sample the sample's ``json``
record (so training needs no video shard when every encoder is cached) and ``<key>.<encoder>.feat`` (the feature
array), plus ``shard-NNNNNN.json`` indexes and a ``manifest.json``. What is stored is what the first trainable
operation consumes: for the parameter-free pooling projectors (``avgpool3d``, ``avgpool2d``) the pooled grid
``[T_out * n, C]``, otherwise the encoder's output ``[T', N, C]``.

The cache key covers everything that changes the features: the encoder's weights (content hash), architecture, feature
layer, frame count, image size and preprocessing, the pooling when pooled, the stored dtype, and the source frames: a
digest of exactly the frames this encoder reads (the sharder records one per frame count and sample). Another
encoder's frame count, or the shard boundaries, do not enter it. Before training reads a cache, the key is recomputed
from the config and the current shards and compared field by field: a difference is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from merv.config import EncoderConfig, ModelConfig, fingerprint

FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMBER = "{encoder}.feat"


class FeatureCacheError(ValueError):
    """A cache that cannot be used: missing, corrupt, or made for other settings than the config's."""


def member(encoder: str) -> str:
    return MEMBER.format(encoder=encoder)


# ------------------------------------------------------------------------------------------------------------------
# Keys


def weights_digest(path: str | Path) -> str:
    """sha256 of a weight file or folder (every file in it, by relative path), remembered per (path, size, mtime) in
    ``~/.cache/merv/weights-digests.json`` so that a 1 GB checkpoint is hashed once."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    names = [str(p.relative_to(path)) if path.is_dir() else p.name for p in files]
    stamp = [[name, p.stat().st_size, p.stat().st_mtime_ns] for name, p in zip(names, files, strict=True)]
    memo_path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merv" / "weights-digests.json"
    memo_key = fingerprint([str(path), stamp])
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    for (name, _, _), p in zip(stamp, files, strict=True):
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**memo, memo_key: digest}))
        tmp.replace(memo_path)
    except OSError:
        pass  # the memo only saves time
    return digest


def encoder_key(model: ModelConfig, encoder: EncoderConfig, dtype: str) -> dict:
    """The fields of the cache key that come from the config and the weights (``encoder`` resolved: absolute weights,
    explicit preprocessing)."""
    pooled = model.projector.parameter_free
    return {
        "format": FORMAT_VERSION,
        "encoder": encoder.id,
        "kind": encoder.kind,
        "arch": encoder.arch,
        "model_kwargs": encoder.model_kwargs,
        "weights_sha256": weights_digest(encoder.weights),
        "feature_layer": encoder.feature_layer,
        "num_frames": encoder.num_frames,
        "image_size": encoder.image_size,
        "preprocess": {k: getattr(encoder, k) for k in ("resize", "crop_pct", "mean", "std", "hflip")},
        "pooling": ({k: v for k, v in dataclasses.asdict(model.projector).items() if k != "head"} if pooled else None),
        "dtype": dtype,
    }


def source_digest(shard_manifest: dict, num_frames: int) -> str:
    """Digest of the frames an encoder of ``num_frames`` reads from a shard folder, in sample order (from the
    per-sample, per-frame-count digests the sharder records): changes only when those frames, or the samples and
    their order, change."""
    digests = shard_manifest.get("frame_digests")
    if not digests or str(num_frames) not in digests:
        raise FeatureCacheError(
            f"the shards do not record digests of their {num_frames}-frame samples (written by an older merv "
            "shard?): reshard them"
        )
    return digests[str(num_frames)]


def compare_keys(expected: dict, found: dict, where: str) -> None:
    """Raise naming every field where a cache's key differs from what the config expects."""
    expected, found = json.loads(json.dumps(expected)), json.loads(json.dumps(found))  # tuples compare as lists
    diffs = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if diffs:
        details = "; ".join(f"{k}: cache has {found.get(k)!r}, the config needs {expected.get(k)!r}" for k in diffs)
        raise FeatureCacheError(
            f"{where}: the feature cache was made for other settings ({details}); extract it again "
            "(`merv features` / the pipeline's extract_feature_part and gather_features rules)"
        )


# ------------------------------------------------------------------------------------------------------------------
# Arrays


def to_bytes(array: torch.Tensor, dtype: str) -> bytes:
    """A feature array as ``.npy`` bytes in ``dtype`` (bf16 stored as its uint16 bit pattern)."""
    t = array.detach().to("cpu", DTYPES[dtype]).contiguous()
    arr = t.view(torch.uint16).numpy() if dtype == "bf16" else t.numpy()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def from_bytes(payload: bytes, dtype: str, where: str) -> torch.Tensor:
    """The inverse of :func:`to_bytes`; a damaged payload is a :class:`FeatureCacheError` naming ``where``."""
    try:
        arr = np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as e:  # numpy raises several kinds on damaged bytes
        raise FeatureCacheError(f"{where}: not a readable feature array ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr.copy())
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Reading a cache


def read_cache_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FeatureCacheError(f"{folder}: no manifest.json (not a finished feature cache; run `merv features`)")
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """An opened, validated cache of one encoder: its folder, manifest and per-shard indexes."""

    encoder: str
    folder: Path
    manifest: dict

    @property
    def dtype(self) -> str:
        return self.manifest["key"]["dtype"]

    @property
    def member(self) -> str:
        """The tar member name of this encoder's features (``<key>.<member>``)."""
        return member(self.encoder)

    def misaligned(self, shard: Path, key: str | None, cached_key: str | None) -> FeatureCacheError:
        """The error for a cache read beside ``shard`` whose samples do not line up with it."""
        return FeatureCacheError(
            f"{self.folder}: its samples do not line up with {shard} (at {key!r} vs {cached_key!r}): extract it again"
        )

    def decode(self, raw: dict) -> torch.Tensor | None:
        """This encoder's features in a raw sample (None for a text-only sample), checked against the digest its
        shard index records: a damaged cache file is an error naming it, never a silent wrong input."""
        name = self.member
        if name not in raw:
            return None
        shard = Path(raw.get(f"{name}.__url__", raw["__url__"])).name
        where = f"{self.folder / shard}: sample {raw['__key__']!r}"
        expected = _index(str(self.folder), shard)["digests"].get(raw["__key__"])
        if expected != sha256(raw[name]):
            raise FeatureCacheError(f"{where}: feature bytes do not match their recorded sha256 (damaged cache)")
        return from_bytes(raw[name], self.dtype, where)


@functools.lru_cache(maxsize=64)
def _index(folder: str, shard: str) -> dict:
    path = Path(folder) / f"{shard.removesuffix('.tar')}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{path}: missing or unreadable shard index ({e})") from None


def open_feature_set(
    folder: Path, model: ModelConfig, encoder: EncoderConfig, shard_manifest: dict, keys: list[str]
) -> FeatureSet:
    """Open ``folder`` for ``encoder`` (resolved) and check it against the config and the current shards: its key
    (weights, architecture, layer, frames, preprocessing, pooling, dtype, source frames) and its samples (the shard
    folder's keys, in order). Raises :class:`FeatureCacheError` naming the first thing that differs."""
    folder = Path(folder)
    manifest = read_cache_manifest(folder)
    if "range" in manifest:
        lo, hi = manifest["range"]["shards"]
        raise FeatureCacheError(
            f"{folder}: only a part of a feature cache (shards {lo} to {hi - 1} of {manifest['range']['of']}); "
            "gather the parts into one cache first (`merv gather-features`)"
        )
    found = manifest.get("key", {})
    expected = {
        **encoder_key(model, encoder, found.get("dtype", "?")),
        "source_frames": source_digest(shard_manifest, encoder.num_frames),
    }
    compare_keys(expected, found, str(folder))
    cached = [k for s in manifest["shards"] for k in s["keys"]]
    if cached != keys:
        pairs = enumerate(zip(cached, keys, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(cached), len(keys)))
        raise FeatureCacheError(
            f"{folder}: the cache holds {len(cached)} samples, the shards {len(keys)}; they differ from sample "
            f"#{first} on: extract it again"
        )
    return FeatureSet(encoder.id, folder, manifest)


def open_feature_sets(model: ModelConfig, shard_dir: Path, folders: dict[str, Path]) -> list[FeatureSet]:
    """Open and check the caches of the encoders in ``folders`` (``{encoder: folder}``) for training ``model``
    (resolved) on ``shard_dir``."""
    from merv.data.reader import read_manifest, sample_keys

    if not folders:
        return []
    by_id = {e.id: e for e in model.encoders}
    unknown = sorted(set(folders) - set(by_id))
    if unknown:
        raise FeatureCacheError(f"feature caches given for {unknown}, which model {model.name!r} does not have")
    manifest, keys = read_manifest(shard_dir), sample_keys(shard_dir)
    return [open_feature_set(folder, model, by_id[enc], manifest, keys) for enc, folder in folders.items()]
