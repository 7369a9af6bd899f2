"""The ``merv`` command line: one subcommand per pipeline stage (what the Snakemake rules call)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from merv.data.video import BACKENDS, DEFAULT_BACKEND

log = logging.getLogger("merv")


def load_config_spec(spec: str):
    """A run config from a preset name, a YAML/JSON file, or inline JSON (``{...}``)."""
    from merv.config import available_presets, resolve_run_config, run_config_from_dict

    if spec.lstrip().startswith("{"):
        data = json.loads(spec)
        if "preset" in data:
            return resolve_run_config(data["preset"], data.get("overrides"))
        return run_config_from_dict(data, where="--config")
    path = Path(spec)
    if path.is_file():  # JSON as JSON: YAML 1.1 reads json.dumps's 2e-05 as a string
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return run_config_from_dict(data, where=str(path))
    if spec in available_presets():
        return resolve_run_config(spec)
    raise ValueError(f"--config {spec!r} is neither a file nor a preset; presets: {available_presets()}")


# ------------------------------------------------------------------------------------------------------------------
def cmd_synth(args):
    from merv.data.synth import write_dataset

    summary = write_dataset(
        args.out,
        seed=args.seed,
        train_videos=args.train_videos,
        eval_videos=args.eval_videos,
        size=args.size,
        num_frames=args.frames,
        fps=args.fps,
    )
    log.info("wrote synthetic dataset to %s: %s", args.out, summary)


def cmd_build_tiny(args):
    from merv.fetch import build_local_weights

    run = load_config_spec(args.config)
    written = build_local_weights(run, args.kind, seed=args.seed, skip_encoders=tuple(args.skip_encoder))
    if args.manifest:
        manifest = {"model": run.model.name, "kind": args.kind, "seed": args.seed, "paths": [str(p) for p in written]}
        Path(args.manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(args.manifest).write_text(json.dumps(manifest, indent=1))
    log.info("built %s weights for %s: %s", args.kind, run.model.name, ", ".join(map(str, written)))


def cmd_pretrain(args):
    from merv.pretrain.config import pretrain_config_from_dict
    from merv.pretrain.train import pretrain_encoder

    cfg = pretrain_config_from_dict(json.loads(args.config), where="--config")
    report = pretrain_encoder(cfg, Path(args.out))
    log.info("held-out pretext accuracy %s (chance %s)", report["held_out_accuracy"], report["chance"])


def cmd_probe(args):
    import tempfile

    from merv.pretrain.config import ProbeSettings, pretrain_config_from_dict
    from merv.pretrain.probe import probe_encoders, write_probe

    section = json.loads(args.pretrain)
    specs = {name: pretrain_config_from_dict(spec, f"pretrain.{name}") for name, spec in section.items()}
    unknown = sorted(set(args.encoder) - set(specs))
    if unknown:
        raise ValueError(f"--encoder {unknown}: not in the pretrain config (it has {sorted(specs)})")
    if args.encoder:
        specs = {name: specs[name] for name in args.encoder}
    settings = ProbeSettings(train_clips=args.train_clips, test_clips=args.test_clips, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="merv-probe-") as scratch:
        rows = probe_encoders(specs, Path(args.root), settings, scratch)
    written = write_probe(rows, settings, Path(args.out))
    print((Path(args.out) / "probe.md").read_text(), end="")
    log.info("wrote %s", ", ".join(str(p) for p in written))


def cmd_report(args):
    from merv.report.tables import report_config_from_dict, write_report

    written = write_report(report_config_from_dict(json.loads(args.spec), where="--spec"), Path(args.out))
    print((Path(args.out) / "main.md").read_text(), end="")
    log.info("wrote %s", ", ".join(str(p) for p in written))


def cmd_fetch_weights(args):
    from merv.fetch import fetch_weights

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run = load_config_spec(args.preset)
    records = fetch_weights(run, args.root, allow_unpinned=args.allow_unpinned)
    for r in records:
        state = "downloaded" if r["downloaded"] else "present"
        log.info("%s: %s (%s, commit %s)", r["name"], r["path"], state, r["commit"] or "unknown: not fetched by merv")
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps({"model": run.model.name, "weights": records}, indent=1) + "\n")


def cmd_status(args):
    from merv.pipeline import model_status, status_table

    config = {}
    for path in args.configfile:  # later files patch earlier ones, as snakemake --configfile does
        config = deep_update(config, yaml.safe_load(Path(path).read_text()))
    rows = [model_status(config, name, Path(args.root)) for name in config["models"]]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(status_table(rows))


def deep_update(base: dict, patch: dict) -> dict:
    """``patch`` merged into a copy of ``base``, mappings recursively (how Snakemake merges config files)."""
    out = dict(base)
    for key, value in patch.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_size(text: str) -> int:
    """``'200MB'``, ``'1GiB'``, ``'65536'`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].upper() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200MB, 1GiB, 65536)")
    return int(float(match[1]) * units[match[2].upper()])


def cmd_shard(args):
    from merv.data.shards import ShardSettings, collect_items, write_shards

    items = collect_items([Path(p) for p in args.inputs], Path(args.root) if args.root else None)
    settings = ShardSettings(
        frame_counts=tuple(args.frames),
        size=args.size,
        target_bytes=args.shard_size,
        frame_format=args.frame_format,
        backend=args.backend,
    )
    summary = write_shards(
        items, Path(args.out), settings, workers=args.workers, strict=args.strict, progress=not args.no_progress
    )
    log.info("%s: %s", args.out, summary.line())
    if summary.bad:
        log.info("bad items are listed in %s", Path(args.out) / "quarantine.jsonl")


def cmd_index_media(args):
    from merv.data.media import build_index, write_index

    index = build_index(Path(args.source), Path(args.root) if args.root else None)
    write_index(index, Path(args.out))
    missing = sum(1 for _, size, _ in index["media"] if size is None)
    log.info("%s: %d media files indexed (%d missing)", args.out, len(index["media"]), missing)
    if index["problem"]:
        log.warning("%s: %s (left to sharding to report)", args.source, index["problem"])


def cmd_inspect(args):
    from merv.data.shards import iter_samples, read_manifest

    manifest = read_manifest(Path(args.dir))
    if args.sample is None:
        print(
            json.dumps(
                {k: v for k, v in manifest.items() if k != "shards"} | {"num_shards": len(manifest["shards"])},
                indent=1,
            )
        )
        return
    for sample in iter_samples(Path(args.dir)):
        if sample["meta"]["key"] == args.sample:
            frames = sample["frames"]  # None for a text-only sample
            print(json.dumps(sample["meta"] | {"frames": None if frames is None else list(frames.shape)}, indent=1))
            return
    raise ValueError(f"{args.dir}: no sample with key {args.sample!r}")


def parse_features(items: list[str] | None) -> dict[str, str]:
    """``["vit=DIR", ...]`` -> ``{"vit": "DIR"}`` (``merv train --features``)."""
    out = {}
    for item in items or []:
        encoder, sep, folder = item.partition("=")
        if not sep or not encoder or not folder:
            raise ValueError(f"--features {item!r}: expected ENCODER=FOLDER")
        out[encoder] = folder
    return out


def launch_config(args):
    from merv.train.launch import LaunchConfig

    return LaunchConfig(
        launcher=args.launcher,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time_min=args.time,
        folder=args.submitit_dir,
    )


def cmd_train(args):
    from merv.config import with_loader_workers
    from merv.train.loop import train_stage

    # the worker count is part of the sample order: named in the run config, so the checkpoint records it
    run = with_loader_workers(load_config_spec(args.config), args.workers)
    run.train.stage(args.stage)  # an unknown stage fails here, before anything is submitted
    features = parse_features(args.features)
    if args.launcher == "none":
        train_stage(
            run,
            args.stage,
            Path(args.data),
            Path(args.out),
            Path(args.init) if args.init else None,
            progress=not args.no_progress,
            features={k: Path(v) for k, v in features.items()},
        )
        return
    from merv.train.launch import TrainJob, submit

    job = TrainJob(run.to_dict(), args.stage, args.data, args.out, args.init, features)
    meta = submit(job, launch_config(args))
    log.info("stage %s finished on %d processes: final loss %.4f", args.stage, meta["processes"], meta["final_loss"])


def cmd_features(args):
    from merv.features.extract import ExtractSettings, FeaturesJob, extract_features, write_manifest
    from merv.weights import resolve_model

    run = load_config_spec(args.config)
    settings = ExtractSettings(dtype=args.dtype, batch_size=args.batch_size, device=args.device)
    if args.launcher == "none":
        from merv.train.distributed import barrier, init_distributed

        d = init_distributed()  # one process, or one per GPU under torchrun
        model = resolve_model(run.model)
        result = extract_features(
            Path(args.shards), model, args.encoder, Path(args.out), settings, d.rank, d.world_size, not args.no_progress
        )
        barrier(d)
        if d.world_size > 1 and d.is_main:
            result = write_manifest(Path(args.shards), model, args.encoder, Path(args.out), settings, 0.0)
    else:
        from merv.train.launch import submit

        job = FeaturesJob(run.to_dict(), args.encoder, args.shards, args.out, settings)
        result = submit(job, launch_config(args))
    if result is not None:
        log.info(
            "%s: %d samples (%d with features) of shape %s as %s, %d bytes a sample",
            args.out, result["samples"], result["features"], result["shape"], args.dtype, result["bytes_per_sample"],
        )  # fmt: skip


def cmd_eval(args):
    from merv.eval.benchmark import CheckpointHandle, EvalSettings, evaluate
    from merv.eval.cache import ResultCache
    from merv.eval.judge import Judge, resolve_judge_config

    settings = EvalSettings(
        mcq=args.mcq,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_chunks=args.num_chunks,
        chunk_index=args.chunk_index,
        limit=args.limit,
    )
    judge = None
    if not args.no_judge:
        section = {}
        if args.pipeline_config:
            section = (yaml.safe_load(Path(args.pipeline_config).read_text()).get("eval") or {}).get("judge") or {}
        flags = {
            "url": args.judge_url,
            "model": args.judge_model,
            "preset": args.judge_preset,
            "api_key_env": args.judge_api_key_env,
            "api_key_file": args.judge_api_key_file,
            "prompt_file": args.judge_prompt_file,
            "unparseable": args.judge_unparseable,
            "concurrency": args.judge_concurrency,
            "timeout_s": args.judge_timeout,
            "max_attempts": args.judge_max_attempts,
        }
        cfg = resolve_judge_config(flags, section=section)
        judge = Judge(cfg) if cfg else None
    from merv.digests import DigestMemo

    # the weights' digests are remembered beside the answers they key (see merv.digests for the trade-off)
    memo = DigestMemo(None if args.no_cache else Path(args.cache) / "digests.json")
    handle = CheckpointHandle(args.model, device=args.device, dtype=args.dtype, memo=memo)
    cache = ResultCache(None if args.no_cache else args.cache)
    name = args.name or Path(args.data).name
    try:
        result = evaluate(handle, Path(args.data), name, settings, cache=cache, judge=judge)
    finally:
        cache.close()
    write_json(args.out, result)
    summary, run = result["summary"], result["run"]
    log.info(
        "%s chunk %d/%d: %s = %s (n=%d); model answered %d, loads %d; judge requests %d",
        name,
        settings.chunk_index,
        settings.num_chunks,
        summary["metric"],
        "n/a" if summary["value"] is None else f"{summary['value']:.4f}",
        summary["n"],
        run["answered_by_model"],
        run["model_loads"],
        run["judge_requests"],
    )


def write_json(path: str | Path, obj) -> None:
    """Write strict JSON atomically (a temp file renamed into place), so a killed job never leaves half a result;
    a NaN or infinity is an error naming the file (strict JSON readers refuse them)."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError as e:
        raise ValueError(f"{path}: not written: {e} (a non-finite number reached the result)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_merge(args):
    from merv.eval.merge import merge_files

    result = merge_files(args.chunks)
    write_json(args.out, result)
    s = result["summary"]
    log.info("%s: merged %d chunks, %d questions; %s = %s", result["benchmark"], len(args.chunks), s["n"],
             s["metric"], s["value"])  # fmt: skip


def cmd_collect(args):
    from merv.config import fingerprint
    from merv.eval.merge import read_result

    benchmarks = {}
    for path in args.results:
        r = read_result(path)
        if r.get("chunk", {}).get("count", 1) != 1:
            raise ValueError(f"{path}: a chunk result ({r['chunk']}); merge the chunks first (merv merge)")
        benchmarks[r["benchmark"]] = {
            **r["summary"],
            "questions": r["questions"],
            "config_fingerprint": r["config_fingerprint"],
            "manifest": r["manifest"],
        }
    out = {
        "model": args.model,
        "config_fingerprint": fingerprint(sorted(b["config_fingerprint"] for b in benchmarks.values())),
        "benchmarks": benchmarks,
    }
    write_json(args.out, out)
    for name, b in benchmarks.items():
        log.info("%s: %s = %s (n=%d)", name, b["metric"], b["value"], b["n"])


def cmd_table(args):
    from merv.eval.table import write_table

    files = write_table(args.results, args.out)
    print(files["markdown"].read_text(), end="")
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))


def cmd_import_original(args):
    from merv.convert import import_original

    out = import_original(Path(args.checkpoint), load_config_spec(args.config), Path(args.out))
    log.info("imported %s into %s", args.checkpoint, out)


def cmd_generate(args):
    from merv.api import load_vid

    model = load_vid(args.model, device=args.device, dtype=args.dtype)
    builder = model.get_prompt_builder()
    builder.add_turn("human", args.prompt)
    print(model.generate(args.video, builder.get_prompt(), max_new_tokens=args.max_new_tokens))


def serve_settings(args):
    """``merv serve``'s options as :class:`ServeSettings` (the API key from ``--api-key`` or ``MERV_API_KEY``)."""
    from merv.serve.settings import API_KEY_ENV, ServeSettings

    return ServeSettings(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allowed_hosts=tuple(args.allowed_host),
        allowed_dirs=tuple(Path(d) for d in args.allowed_dir),
        allowed_media_domains=tuple(args.allowed_media_domain),
        allowed_media_networks=tuple(args.allowed_media_network),
        max_media_redirects=args.max_media_redirects,
        max_upload_mb=args.max_upload_mb,
        download_timeout_s=args.download_timeout,
        max_frame_pixels=args.max_frame_pixels,
        max_request_pixels=args.max_request_pixels,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        default_max_tokens=args.default_max_tokens,
    )


def cmd_serve(args):
    from merv.serve.app import serve

    serve(serve_settings(args))


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of the inference commands (see merv.runtime)."""
    from merv.runtime import DEVICE_CHOICES, DTYPE_CHOICES

    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA when present)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto (default): bf16 on CUDA, fp32 on CPU"
    )


# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merv", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the built-in synthetic dataset (videos, training JSON, benchmarks)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-videos", type=int, default=400)
    s.add_argument("--eval-videos", type=int, default=100)
    s.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    s.add_argument("--frames", type=int, default=16, help="frames per clip")
    s.add_argument("--fps", type=int, default=8)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("build-tiny", help="build random toy weights where a config points (no download)")
    s.add_argument("--config", required=True, help="preset name, YAML/JSON file, or inline JSON")
    s.add_argument(
        "--kind",
        choices=["tiny", "standin"],
        default="tiny",
        help="tiny: exactly the configured (tiny) architectures; standin: any preset's families at toy size",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--manifest", help="write a JSON listing what was built")
    s.add_argument("--skip-encoder", action="append", default=[], help="an encoder whose weights come elsewhere")
    s.set_defaults(func=cmd_build_tiny)

    s = sub.add_parser("pretrain", help="pretrain a tiny encoder on its synthetic pretext task (merv.pretrain)")
    s.add_argument("--config", required=True, help="inline JSON of one config `pretrain:` entry")
    s.add_argument("--out", required=True, help="folder for the weights and pretext.json")
    add_compute_options(s)
    s.set_defaults(func=cmd_pretrain)

    from merv.pretrain.config import PRETRAINED_DIR
    from merv.pretrain.config import ProbeSettings as Probe

    s = sub.add_parser(
        "probe", help="linear probes of the pretrained encoders: colour, shape, direction (merv.pretrain)"
    )
    s.add_argument("--pretrain", required=True, help="inline JSON of config `pretrain:` (name -> entry)")
    s.add_argument("--encoder", action="append", default=[], help="probe only this pretrain entry (repeatable)")
    s.add_argument(
        "--root", default=PRETRAINED_DIR, help=f"folder of the pretrained encoders (default {PRETRAINED_DIR})"
    )
    s.add_argument("--out", required=True, help="folder for probe.csv, probe.md and probe.json")
    s.add_argument("--train-clips", type=int, default=Probe.train_clips, help=f"default {Probe.train_clips}")
    s.add_argument("--test-clips", type=int, default=Probe.test_clips, help=f"default {Probe.test_clips}")
    s.add_argument("--seed", type=int, default=Probe.seed, help=f"the probe's clips (default {Probe.seed})")
    add_compute_options(s)
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("report", help="the paper's tables and figures across models (merv.report)")
    s.add_argument("--spec", required=True, help="inline JSON: models, their results and checkpoints, benchmarks")
    s.add_argument("--out", required=True, help="folder for the Markdown/CSV tables, metrics.json and PNGs")
    add_compute_options(s)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("fetch-weights", help="download a model's missing weights from their sources (hub, timm)")
    s.add_argument("preset", help="preset name, YAML/JSON file, or inline JSON")
    s.add_argument("--root", help="folder relative weight paths live under (default: $MERV_WEIGHTS, else the cwd)")
    s.add_argument("--record", help="write a JSON of where each weight is (the pipeline's marker file)")
    s.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="fetch parts whose config pins no commit (revision: unpinned) at the hub's current commit (recorded)",
    )
    s.set_defaults(func=cmd_fetch_weights)

    s = sub.add_parser("status", help="which configured models are trained and evaluated (from results/)")
    s.add_argument(
        "--configfile", nargs="+", default=["config/config.yaml"], help="pipeline config(s), as given to snakemake"
    )
    s.add_argument("--root", default=".", help="project folder holding data/ and results/")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("shard", help="decode media once into WebDataset tars of pre-sampled frames")
    s.add_argument("inputs", nargs="+", help="training JSON files, eval_data benchmark folders or folders of videos")
    s.add_argument("--out", required=True)
    s.add_argument("--root", help="folder that media paths in a training JSON are relative to (default: its folder)")
    s.add_argument("--frames", type=int, nargs="+", required=True, help="frame counts of the encoders, e.g. 16 32")
    s.add_argument(
        "--size",
        type=int,
        required=True,
        help="short side of the stored frames, aspect ratio kept (the largest encoder input size)",
    )
    s.add_argument("--shard-size", type=parse_size, default="200MB", help="target size of a tar (default 200MB)")
    s.add_argument("--frame-format", choices=["jpg", "npy"], default="jpg", help="jpg (default) or lossless npy")
    s.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND, help="video decoder")
    s.add_argument("--workers", type=int, default=1, help="decoding processes")
    s.add_argument("--strict", action="store_true", help="fail on the first bad item instead of quarantining it")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("index-media", help="list a data source's media with size and mtime (the pipeline's trigger)")
    s.add_argument("source", help="a training JSON, an eval_data benchmark folder or a folder of videos")
    s.add_argument("--root", help="folder that media paths in a training JSON are relative to (default: its folder)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_index_media)

    s = sub.add_parser("inspect", help="print a shard folder's manifest summary, or one sample")
    s.add_argument("dir")
    s.add_argument("--sample", help="key of a sample to print")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("train", help="train one stage and write a checkpoint folder")
    s.add_argument("--config", required=True, help="preset name, YAML/JSON file, or inline JSON")
    s.add_argument("--stage", required=True)
    s.add_argument("--data", required=True, help="shard folder of the stage's training data")
    s.add_argument("--out", required=True)
    s.add_argument("--init", help="checkpoint folder to start from (e.g. the previous stage)")
    s.add_argument(
        "--features",
        action="append",
        metavar="ENCODER=DIR",
        help="read this encoder's cached features (merv features) instead of running it; repeat per encoder",
    )
    s.add_argument("--no-progress", action="store_true")
    add_compute_options(s, workers=True)
    add_launch_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("features", help="cache one frozen encoder's features over a shard folder")
    s.add_argument("shards", help="shard folder (merv shard)")
    s.add_argument("--config", required=True, help="preset name, YAML/JSON file, or inline JSON")
    s.add_argument("--encoder", required=True, help="id of the encoder in the config")
    s.add_argument("--out", required=True, help="cache folder")
    s.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="stored dtype (default bf16)")
    s.add_argument("--batch-size", type=int, default=16, help="samples per encoder forward")
    s.add_argument("--device", default=None, help="auto (default: CUDA when present), cpu, cuda or cuda:N")
    s.add_argument("--no-progress", action="store_true")
    add_compute_options(s)
    add_launch_options(s)
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("eval", help="evaluate a checkpoint on one sharded benchmark (or one chunk of it)")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--data", required=True, help="shard folder of the benchmark")
    s.add_argument("--name", help="benchmark name, looked up in the registry (default: the shard folder's name)")
    s.add_argument("--out", required=True, help="result JSON (rows, summary, manifest)")
    s.add_argument("--mcq", choices=["generate", "likelihood", "both"], default="both", help="how MCQ is answered")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, help="generation limit (default: the benchmark's, e.g. 512)")
    s.add_argument("--num-chunks", type=int, default=1, help="split the benchmark into N chunks ...")
    s.add_argument("--chunk-index", type=int, default=0, help="... and evaluate chunk K (0-based)")
    s.add_argument("--limit", type=int, help="only the first N questions of the benchmark (a quick look)")
    s.add_argument("--cache", default="results/eval_cache", help="cache folder of answers and verdicts")
    s.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    add_runtime_options(s)
    add_compute_options(s)
    g = s.add_argument_group(
        "judge (open-ended)",
        "an OpenAI-compatible chat-completions endpoint; each setting also comes from MERV_JUDGE_URL, "
        "MERV_JUDGE_MODEL, MERV_JUDGE_PRESET, MERV_JUDGE_API_KEY_FILE, MERV_JUDGE_PROMPT_FILE, MERV_JUDGE_UNPARSEABLE "
        "or the eval.judge section of "
        "--pipeline-config. Without a URL open-ended answers are scored by exact match.",
    )
    g.add_argument("--judge-url", help="e.g. http://localhost:8000/v1 (vLLM, SGLang) or https://api.openai.com/v1")
    g.add_argument("--judge-model", help="model name (default: the one model the endpoint serves)")
    g.add_argument("--judge-preset", help="video-chatgpt (ours: temperature 0) or merv-original (max_tokens 500)")
    g.add_argument("--judge-api-key-env", help="environment variable holding the API key (default MERV_JUDGE_API_KEY)")
    g.add_argument("--judge-api-key-file", help="file holding the API key")
    g.add_argument(
        "--judge-prompt-file",
        help="the judge's wording: YAML with 'system' and 'user' texts naming {question}, {answer} and {prediction} "
        "(e.g. Video-ChatGPT's original); default: merv's built-in wording",
    )
    g.add_argument(
        "--judge-unparseable",
        choices=["unjudged", "no"],
        help="a reply that never parses: unjudged (default: reported, asked again next run) or no (score 0, as the "
        "original batch script counts it)",
    )
    g.add_argument("--judge-concurrency", type=int, help="requests in flight (default 8)")
    g.add_argument("--judge-timeout", type=float, help="seconds per request (default 60)")
    g.add_argument("--judge-max-attempts", type=int, help="tries per request on timeouts/5xx/refused (default 5)")
    g.add_argument("--pipeline-config", help="read eval.judge from this config (e.g. config/config.yaml)")
    g.add_argument("--no-judge", action="store_true", help="no judge even if the environment names one")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("merge", help="join a benchmark's chunk results (every question exactly once)")
    s.add_argument("chunks", nargs="+", help="chunk result files of one benchmark")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("collect", help="merge per-benchmark results into one eval.json")
    s.add_argument("results", nargs="+")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_collect)

    s = sub.add_parser("table", help="Markdown + CSV + bar chart PNG across models' eval.json")
    s.add_argument("results", nargs="+", help="eval.json files (results/*/eval.json)")
    s.add_argument("--out", required=True, help="folder for table.md, table.csv, table.png")
    s.set_defaults(func=cmd_table)

    s = sub.add_parser("import-original", help="convert a checkpoint of the original MERV code into a merv folder")
    s.add_argument("checkpoint", help="the original's .pt file (read with weights_only=True)")
    s.add_argument("--config", required=True, help="the matching model: preset name, YAML/JSON file or inline JSON")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_import_original)

    s = sub.add_parser("generate", help="answer a prompt about one video")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--video", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    add_runtime_options(s)
    s.set_defaults(func=cmd_generate)

    from merv.serve.settings import ServeSettings as Serve  # one source for the defaults

    s = sub.add_parser("serve", help="OpenAI-compatible chat-completions server with a chat page at /")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--host", default=Serve.host, help=f"address to listen on (default {Serve.host})")
    s.add_argument("--port", type=int, default=Serve.port, help=f"default {Serve.port}; 0: any free port")
    s.add_argument("--served-model-name", help="the model id clients send (default: the model config's name)")
    s.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every route but /health (default: the MERV_API_KEY variable; "
        "prefer it: a command line is visible to other users of the machine)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name clients use besides localhost (repeatable; needed with a non-loopback --host; '*': any)",
    )
    s.add_argument(
        "--allowed-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder file:// video URLs may point into, listed by the chat page (repeatable)",
    )
    s.add_argument(
        "--allowed-media-domain",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name http(s):// media may come from (repeatable; exact names; default: none, http(s) off)",
    )
    s.add_argument(
        "--allowed-media-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="a private network the allowed media names may resolve into, e.g. an intranet 10.1.0.0/16 (repeatable)",
    )
    s.add_argument(
        "--max-media-redirects",
        type=int,
        default=Serve.max_media_redirects,
        help=f"redirects followed per media URL, each checked like the URL (default {Serve.max_media_redirects})",
    )
    s.add_argument(
        "--max-frame-pixels",
        type=int,
        default=Serve.max_frame_pixels,
        help=f"width x height of one frame, from its header before decoding (default {Serve.max_frame_pixels})",
    )
    s.add_argument(
        "--max-request-pixels",
        type=int,
        default=Serve.max_request_pixels,
        help=f"pixels of all frames a request makes the server decode (default {Serve.max_request_pixels})",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=Serve.max_upload_mb,
        help=f"largest video or frame set per request: data URL, download or upload (default {Serve.max_upload_mb:g})",
    )
    s.add_argument("--download-timeout", type=float, default=Serve.download_timeout_s, help="seconds, http(s) videos")
    s.add_argument("--max-batch", type=int, default=Serve.max_batch, help="most requests per generate call")
    s.add_argument(
        "--batch-wait-ms", type=float, default=Serve.batch_wait_ms, help="how long a request waits for others to batch"
    )
    s.add_argument(
        "--default-max-tokens", type=int, default=Serve.default_max_tokens, help="when a request names no max_tokens"
    )
    add_runtime_options(s)
    s.set_defaults(func=cmd_serve)
    return p


def add_compute_options(s: argparse.ArgumentParser, workers: bool = False) -> None:
    """``--threads`` / ``--isa`` (config ``compute``) of a command that computes: applied by :func:`main` before
    anything runs (merv.runtime.reproducible), so its float results are the same bytes in every run."""
    from merv.config import ComputeConfig

    g = s.add_argument_group("compute (config `compute`: what the float results depend on)")
    g.add_argument(
        "--threads",
        type=int,
        default=ComputeConfig.threads,
        help=f"CPU compute threads, whatever cores the job was given (default {ComputeConfig.threads})",
    )
    g.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default=ComputeConfig.isa,
        help=f"CPU code path: this CPU's own, or AVX2 on every machine (default {ComputeConfig.isa})",
    )
    if workers:
        g.add_argument(
            "--workers",
            type=int,
            default=ComputeConfig.loader_workers,
            help="DataLoader workers when the stage names no num_workers (part of the sample order; "
            f"default {ComputeConfig.loader_workers})",
        )


def add_launch_options(s: argparse.ArgumentParser) -> None:
    """How a job runs: in this process (or under torchrun), or submitted through submitit."""
    g = s.add_argument_group("launch (submitit)")
    g.add_argument(
        "--launcher",
        choices=["none", "local", "slurm"],
        default="none",
        help="none: train in this process (or under torchrun); local/slurm: submit through submitit",
    )
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU)")
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--cpus-per-task", type=int, default=1)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", type=int, default=60, help="time limit in minutes")
    g.add_argument("--submitit-dir", default="results/submitit", help="submitit's job folders and logs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.command != "fetch-weights":  # only fetch-weights downloads: every other command stays offline
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # the HTTP clients' request lines and headers stay out of the logs (they may carry a judge's API key)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from merv.data.shards import DataFormatError
    from merv.data.video import VideoError
    from merv.eval.judge import JudgeUnavailable
    from merv.train.launch import JobFailed

    try:
        if hasattr(args, "threads"):  # a command that computes: pinned before torch runs anything
            from merv.runtime import reproducible

            log.debug("compute settings: %s", reproducible(args.threads, args.isa))
        args.func(args)
    except (VideoError, DataFormatError, FileNotFoundError, ValueError, JudgeUnavailable, JobFailed) as e:
        if args.verbose:
            raise
        print(f"merv {args.command}: error: {e}", file=sys.stderr)
        return 1
    log.info("merv %s: %s", args.command, resource_line())
    return 0


def resource_line() -> str:
    """CPU seconds (user + system, this process and the children it waited for) and peak memory: what a job cost,
    which, unlike its wall time, barely depends on what else runs on the machine (benchmarks/pipeline_timing.py)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return f"cpu {cpu:.1f} s, max rss {max(own.ru_maxrss, children.ru_maxrss) / 1024:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
