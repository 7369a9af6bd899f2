"""``merv features``: run one frozen encoder over every sample of a shard folder and cache what training consumes.

The cache's shards mirror the video shards at extraction time (same names, keys and order). Each is written under a
temporary name, renamed, then committed by its index, so an interrupted extraction keeps its finished shards and a
rerun does only the rest, ending with the same bytes; videos appended to the shard folder add only their shards.
Several processes (one per GPU; ``torchrun`` or submitit tasks) split the shards among them; the last step writes the
manifest once every shard is committed. A shard range (``--shard-range A:B``) extracts one part of a folder as a part
cache, which :func:`merv.features.parts.gather_features` joins with the others (scatter–gather over separate jobs).
The manifest holds no timing: it is a function of the cache's content, so a gathered cache has the bytes of one
extraction.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import torch

from merv.config import ModelConfig, fingerprint
from merv.data.reader import decode_sample, read_manifest, shard_keys
from merv.data.transforms import video_inputs
from merv.features.cache import encoder_key, member, sha256, source_digest, to_bytes
from merv.settings import ExtractSettings

log = logging.getLogger(__name__)


def cache_key(model: ModelConfig, encoder_id: str, shard_manifest: dict, dtype: str) -> dict:
    encoder = next(e for e in model.encoders if e.id == encoder_id)
    return {**encoder_key(model, encoder, dtype), "source_frames": source_digest(shard_manifest, encoder.num_frames)}


def shard_key(key: dict, shard: dict) -> str:
    """What one cache shard depends on: the cache's key but its split-wide source digest, and the digest of this
    video shard's frames of the encoder's count (``shard``: its entry in the shard folder's manifest). A shard is
    redone when this changes, and only then."""
    frames = shard["frame_digests"][str(key["num_frames"])]
    return fingerprint([{k: v for k, v in key.items() if k != "source_frames"}, frames])


def parse_shard_range(spec: str) -> tuple[int, int | None]:
    """``"A:B"`` -> ``(A, B)``: the shards ``A`` up to (not including) ``B`` of a folder's list, 0-based; ``B`` may
    be left out (to the end) and may pass the end (a fixed step of parts: the last one is short)."""
    start, sep, stop = spec.partition(":")
    try:
        lo, hi = int(start or 0), (int(stop) if stop else None)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 0 or (hi is not None and hi <= lo):
        raise ValueError(f"shard range {spec!r}: expected A:B with 0 <= A < B (shards A to B-1), e.g. 0:100")
    return lo, hi


class _Extractor:
    """The encoder (and the parameter-free pooling, when the projector has it) on a device."""

    def __init__(self, model: ModelConfig, encoder_id: str, settings: ExtractSettings):
        from merv.models.encoders import build_encoder
        from merv.models.projector import build_projector
        from merv.runtime import resolve_device

        self.cfg = next(e for e in model.encoders if e.id == encoder_id)
        self.device = resolve_device(settings.device)
        # computed in fp32, whatever dtype a transformers folder is marked with; stored in the cache's dtype
        self.encoder = build_encoder(self.cfg).to(self.device, torch.float32).eval()
        pooled = model.projector.parameter_free
        self.pool = build_projector(model.projector, self.encoder.embed_dim, 1).pool if pooled else None

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        features = self.encoder(videos.to(self.device))  # [B, T', N, C]
        return (self.pool(features) if self.pool is not None else features).float().cpu()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # same input -> same bytes
    tar.addfile(info, io.BytesIO(payload))


def _committed(out: Path, shard: str, keys: list[str], shard_key: str) -> bool:
    index = out / f"{shard.removesuffix('.tar')}.json"
    if not (index.is_file() and (out / shard).is_file()):
        return False
    try:
        found = json.loads(index.read_text())
    except json.JSONDecodeError:
        return False
    return (
        found.get("shard_key") == shard_key
        and found.get("keys") == keys
        and (out / shard).stat().st_size == found["bytes"]
    )


def extract_shard(extractor: _Extractor, shard_dir: Path, shard: str, out: Path, shard_key: str, settings) -> dict:
    """Features of every sample of one video shard, written as ``out/<shard>`` and committed by its index."""
    import webdataset as wds

    samples = [
        decode_sample(raw)
        for raw in wds.DataPipeline(wds.SimpleShardList([str(shard_dir / shard)]), wds.tarfile_to_samples())
    ]
    rows = [i for i, s in enumerate(samples) if s["frames"] is not None]
    feats: dict[int, torch.Tensor] = {}
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start : start + settings.batch_size]
        videos = torch.stack([video_inputs((extractor.cfg,), samples[i])[extractor.cfg.id] for i in batch])
        for i, f in zip(batch, extractor(videos), strict=True):
            feats[i] = f
    tmp = out / f"{shard}.tmp"
    digests = {}
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            key = sample["meta"]["key"]
            _add(tar, f"{key}.json", json.dumps(sample["meta"], sort_keys=True).encode())
            if i in feats:
                payload = to_bytes(feats[i], settings.dtype)
                digests[key] = sha256(payload)
                _add(tar, f"{key}.{member(extractor.cfg.id)}", payload)
    final = out / shard
    tmp.replace(final)
    shape = list(next(iter(feats.values())).shape) if feats else None
    index = {
        "name": shard,
        "shard_key": shard_key,
        "keys": [s["meta"]["key"] for s in samples],
        "samples": len(samples),
        "features": len(feats),
        "shape": shape,
        "digests": digests,
        "bytes": final.stat().st_size,
    }
    tmp_index = out / f"{shard.removesuffix('.tar')}.json.tmp"
    tmp_index.write_text(json.dumps(index))
    tmp_index.replace(out / f"{shard.removesuffix('.tar')}.json")
    return index


def extract_features(
    shard_dir: Path,
    model: ModelConfig,
    encoder_id: str,
    out: Path,
    settings: ExtractSettings = ExtractSettings(),
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    shard_range: tuple[int, int | None] | None = None,
) -> dict | None:
    """Extract (or resume extracting) ``encoder_id``'s features over ``shard_dir`` into ``out``; ``model`` is
    resolved (see :func:`merv.weights.resolve_model`). ``shard_range`` (``(A, B)``, :func:`parse_shard_range`)
    limits it to those shards of the folder (a part cache). Process ``rank`` of ``world_size`` does every
    ``world_size``-th shard; with one process the manifest is written and returned (else :func:`write_manifest`)."""
    from tqdm import tqdm

    if encoder_id not in {e.id for e in model.encoders}:
        raise ValueError(f"model {model.name!r} has no encoder {encoder_id!r}; it has {[e.id for e in model.encoders]}")
    shard_dir, out = Path(shard_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(shard_dir)
    key = cache_key(model, encoder_id, manifest, settings.dtype)
    extractor = None
    start = time.time()
    shards = selected_shards(manifest, shard_range)[rank::world_size]
    done = 0
    for shard in tqdm(shards, desc=f"features {encoder_id}", disable=not progress, mininterval=2):
        keys = shard_keys(shard_dir, shard["name"])
        expected = shard_key(key, shard)
        if _committed(out, shard["name"], keys, expected):
            done += 1
            continue
        extractor = extractor or _Extractor(model, encoder_id, settings)
        extract_shard(extractor, shard_dir, shard["name"], out, expected, settings)
    seconds = time.time() - start
    log.info("%s: %s features of %d shards (%d already there) in %.1fs", out, encoder_id, len(shards), done, seconds)
    if world_size == 1:
        return write_manifest(shard_dir, model, encoder_id, out, settings, shard_range)
    return None


def selected_shards(shard_manifest: dict, shard_range: tuple[int, int | None] | None) -> list[dict]:
    """The manifest's shards in ``shard_range`` (all of them for None)."""
    if shard_range is None:
        return shard_manifest["shards"]
    return shard_manifest["shards"][shard_range[0] : shard_range[1]]


def write_manifest(
    shard_dir: Path,
    model: ModelConfig,
    encoder_id: str,
    out: Path,
    settings,
    shard_range: tuple[int, int | None] | None = None,
) -> dict:
    """The cache's ``manifest.json``, once every shard (of ``shard_range``) is committed; stale shards of earlier
    runs are removed. A range's manifest says so (``"range"``): that folder is a part to gather, not a cache."""
    manifest = read_manifest(shard_dir)
    key = cache_key(model, encoder_id, manifest, settings.dtype)
    indexes = []
    for shard in selected_shards(manifest, shard_range):
        index_path = out / f"{shard['name'].removesuffix('.tar')}.json"
        if not index_path.is_file():
            raise RuntimeError(f"{out}: shard {shard['name']} has no features yet (did every process finish?)")
        indexes.append(json.loads(index_path.read_text()))
    remove_stale(out, {ix["name"] for ix in indexes})
    result = cache_manifest(encoder_id, key, shard_dir, manifest, indexes)
    if shard_range is not None:
        result["range"] = {"shards": [shard_range[0], shard_range[0] + len(indexes)], "of": len(manifest["shards"])}
    save_manifest(out, result)
    return result


def remove_stale(out: Path, names: set[str]) -> None:
    """Delete the cache shards (tars and indexes) of ``out`` that are not among ``names`` (tar names)."""
    for stale in out.glob("shard-*"):
        if stale.name not in names and stale.name.removesuffix(".json") + ".tar" not in names:
            stale.unlink()


def cache_manifest(encoder_id: str, key: dict, shard_dir: Path, shard_manifest: dict, indexes: list[dict]) -> dict:
    """A cache's manifest from its key, the shard folder it mirrors and its shards' indexes (in order): a function of
    those alone (no timing, no host), so that every way of making a cache writes the same bytes."""
    shards = [{k: ix[k] for k in ("name", "keys", "samples", "features", "bytes")} for ix in indexes]
    features = sum(s["features"] for s in shards)
    return {
        "encoder": encoder_id,
        "key": key,
        "fingerprint": fingerprint(key),
        "source": {"dir": str(shard_dir), "fingerprint": shard_manifest["fingerprint"]},
        "samples": sum(s["samples"] for s in shards),
        "features": features,
        "shape": next((ix["shape"] for ix in indexes if ix["features"]), None),
        "bytes_per_sample": round(sum(s["bytes"] for s in shards) / max(1, features)),
        "shards": shards,
    }


def save_manifest(out: Path, manifest: dict) -> None:
    """Write ``out/manifest.json`` atomically: the cache is finished once it is there."""
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")


class FeaturesJob:
    """A picklable extraction call for submitit: each task extracts its share of the shards; the submitting process
    writes the manifest once every task is done (:meth:`finish`). A requeued task resumes at its committed shards."""

    def __init__(
        self,
        run: dict,
        encoder: str,
        shards: str,
        out: str,
        settings: ExtractSettings,
        shard_range: tuple[int, int | None] | None = None,
    ):
        self.run, self.encoder, self.shards, self.out, self.settings = run, encoder, shards, out, settings
        self.shard_range = shard_range
        self.stage = f"features-{encoder}"  # the job name

    def __call__(self) -> None:
        import submitit

        from merv.config import run_config_from_dict
        from merv.runtime import local_device
        from merv.weights import resolve_model

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        env = submitit.JobEnvironment()
        local_device(env.local_rank)  # each task its own GPU ("cuda" is then the task's), not all of them GPU 0
        model = resolve_model(run_config_from_dict(self.run).model)
        extract_features(
            Path(self.shards),
            model,
            self.encoder,
            Path(self.out),
            self.settings,
            env.global_rank,
            env.num_tasks,
            shard_range=self.shard_range,
        )

    def finish(self, results) -> dict:
        from merv.config import run_config_from_dict
        from merv.weights import resolve_model

        model = resolve_model(run_config_from_dict(self.run).model)
        return write_manifest(Path(self.shards), model, self.encoder, Path(self.out), self.settings, self.shard_range)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(
            FeaturesJob(self.run, self.encoder, self.shards, self.out, self.settings, self.shard_range)
        )
