"""The ``merv`` command line: one subcommand per pipeline stage (what the Snakemake rules call)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from merv.settings import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    SECTIONS,
    ComputeSection,
    EvalSection,
    ExtractSettings,
    JudgeSection,
    LaunchSection,
    ShardsSection,
    SynthSection,
    parse_size,
)
from merv.version import __version__

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
    from merv.config import read_json_spec
    from merv.pretrain.config import pretrain_config_from_dict
    from merv.pretrain.train import pretrain_encoder

    cfg = pretrain_config_from_dict(*read_json_spec(args.config, "--config"))
    report = pretrain_encoder(cfg, Path(args.out))
    log.info("held-out pretext accuracy %s (chance %s)", report["held_out_accuracy"], report["chance"])


def cmd_probe(args):
    import tempfile

    from merv.config import read_json_spec
    from merv.pretrain.config import ProbeSettings, pretrain_config_from_dict
    from merv.pretrain.probe import probe_encoders, write_probe

    section, _ = read_json_spec(args.pretrain, "--pretrain")
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
    from merv.report.compare import write_comparison
    from merv.report.config import read_report_spec
    from merv.report.tables import write_report

    if bool(args.results) == bool(args.spec):
        raise ValueError("give either --spec (the pipeline's report) or eval.json files, not both")
    if args.results:  # a quick comparison across models, no spec
        files = write_comparison(args.results, args.out)
        print(files["markdown"].read_text(), end="")
        log.info("wrote %s", ", ".join(str(p) for p in files.values()))
        return
    written = write_report(read_report_spec(args.spec), Path(args.out))
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
    from merv.workflow import Workflow, load_pipeline_config, status_table

    workflow = Workflow(load_pipeline_config(args.configfile), root=args.root)
    rows = [workflow.model_status(name) for name in workflow.runs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(status_table(rows))


def cmd_dvc_yaml(args):
    from merv.workflow import Workflow, load_pipeline_config

    text = Workflow(load_pipeline_config(args.configfile)).dvc_yaml()
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise SystemExit(f"{out} is not what `merv dvc-yaml` makes of {' '.join(args.configfile)}: rerun it")
        log.info("%s is current", out)
        return
    out.write_text(text)
    log.info("wrote %s", out)


def size_argument(text: str) -> int:
    """``--shard-size``: a size such as ``64MB`` (:func:`merv.settings.parse_size`) in bytes."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_shard(args):
    from merv.data.shards import ShardSettings, collect_items, write_shards

    items = collect_items([Path(p) for p in args.inputs], Path(args.root) if args.root else None)
    settings = ShardSettings(
        frame_counts=tuple(args.frames),
        size=args.size,
        target_bytes=args.shard_size,
        frame_format=args.frame_format,
        backend=args.backend,
        scale_in_decoder=args.scale_in_decoder,
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


def cmd_plan_parts(args):
    from merv.data.parts import plan_parts

    plan = plan_parts(Path(args.json), Path(args.out), args.items_per_part, Path(args.root) if args.root else None)
    log.info("%s: %d items in %d parts of up to %d", args.out, plan["items"], len(plan["parts"]), args.items_per_part)


def cmd_gather_shards(args):
    from merv.data.parts import gather_parts

    manifest = gather_parts([Path(p) for p in args.parts], Path(args.out))
    log.info("%s: %d samples, %d quarantined, %d shards", args.out, manifest["samples"], manifest["bad"],
             len(manifest["shards"]))  # fmt: skip


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
    """The submission the launch options describe: every field of ``LaunchConfig`` from its option (two options are
    named otherwise: ``--time`` and ``--submitit-dir``)."""
    from merv.train.launch import LaunchConfig

    option = {"time_min": "time", "folder": "submitit_dir"}
    fields = [f.name for f in dataclasses.fields(LaunchConfig)]
    return LaunchConfig(**{name: getattr(args, option.get(name, name)) for name in fields})


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
    from merv.features.extract import ExtractSettings, FeaturesJob, extract_features, parse_shard_range, write_manifest
    from merv.weights import resolve_model

    run = load_config_spec(args.config)
    settings = ExtractSettings(dtype=args.dtype, batch_size=args.batch_size, device=args.device)
    shard_range = parse_shard_range(args.shard_range) if args.shard_range else None
    if args.launcher == "none":
        from merv.train.distributed import barrier, init_distributed

        d = init_distributed()  # one process, or one per GPU under torchrun
        model = resolve_model(run.model)
        shards, out, enc = Path(args.shards), Path(args.out), args.encoder
        progress = not args.no_progress
        result = extract_features(shards, model, enc, out, settings, d.rank, d.world_size, progress, shard_range)
        barrier(d)
        if d.world_size > 1 and d.is_main:
            result = write_manifest(shards, model, enc, out, settings, shard_range)
    else:
        from merv.train.launch import submit

        job = FeaturesJob(run.to_dict(), args.encoder, args.shards, args.out, settings, shard_range)
        result = submit(job, launch_config(args))
    if result is not None:
        log.info(
            "%s: %d samples (%d with features) of shape %s as %s, %d bytes a sample",
            args.out, result["samples"], result["features"], result["shape"], args.dtype, result["bytes_per_sample"],
        )  # fmt: skip


def cmd_gather_features(args):
    from merv.features.parts import gather_features

    manifest = gather_features([Path(p) for p in args.parts], Path(args.shards), Path(args.out))
    log.info("%s: %d samples (%d with features) in %d shards", args.out, manifest["samples"], manifest["features"],
             len(manifest["shards"]))  # fmt: skip


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
    from merv.eval.merge import collect_results

    out = collect_results(args.results, args.model, args.seed)
    write_json(args.out, out)
    for name, b in out["benchmarks"].items():
        log.info("%s: %s = %s (n=%d)", name, b["metric"], b["value"], b["n"])


def cmd_collect_seeds(args):
    from merv.eval.merge import collect_seeds

    out = collect_seeds(args.results, args.model)
    write_json(args.out, out)
    for name, b in out["benchmarks"].items():
        log.info("%s: %s = %s over seeds %s (n=%d)", name, b["metric"], b["value"], out["seeds"], b["n"])


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
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA when present)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto (default): bf16 on CUDA, fp32 on CPU"
    )


# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merv", description=__doc__)
    p.add_argument("--version", action="version", version=f"merv {__version__}")
    add_verbosity(p, default=False)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the built-in synthetic dataset (videos, training JSON, benchmarks)")
    s.add_argument("--out", required=True)
    for name in ("seed", "train_videos", "eval_videos", "size", "frames", "fps"):
        add_setting(s, "--" + name.replace("_", "-"), SynthSection, name)
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
    s.add_argument("--config", required=True, help="one config `pretrain:` entry: inline JSON or a JSON file")
    s.add_argument("--out", required=True, help="folder for the weights and pretext.json")
    add_compute_options(s)
    s.set_defaults(func=cmd_pretrain)

    from merv.pretrain.config import PRETRAINED_DIR
    from merv.pretrain.config import ProbeSettings as Probe

    s = sub.add_parser(
        "probe", help="linear probes of the pretrained encoders: colour, shape, direction (merv.pretrain)"
    )
    s.add_argument("--pretrain", required=True, help="config `pretrain:` (name -> entry): inline JSON or a JSON file")
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

    for name, help_ in (
        ("report", "the paper's tables and figures across models (--spec), or one table across eval.json files"),
        ("table", "merv report over eval.json files: one table across models (an alias)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("results", nargs="*", help="eval.json files: table.md, table.csv, table.png")
        s.add_argument(
            "--spec", help="inline JSON or a JSON file: models with their seeds' results and checkpoints, benchmarks"
        )
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

    s = sub.add_parser("dvc-yaml", help="write dvc.yaml from the pipeline config (models, seeds, report)")
    s.add_argument(
        "--configfile", nargs="+", default=["config/config.yaml"], help="pipeline config(s), as given to snakemake"
    )
    s.add_argument("--out", default="dvc.yaml")
    s.add_argument("--check", action="store_true", help="only check that --out is current (exit 1 if not)")
    s.set_defaults(func=cmd_dvc_yaml)

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
    add_setting(s, "--shard-size", ShardsSection, "target_size", type=size_argument)
    add_setting(s, "--frame-format", ShardsSection, "frame_format")
    add_setting(s, "--backend", ShardsSection, "backend")
    add_setting(s, "--scale-in-decoder", ShardsSection, "scale_in_decoder")
    add_setting(s, "--workers", ShardsSection, "workers")
    add_setting(s, "--strict", ShardsSection, "strict")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("index-media", help="list a data source's media with size and mtime (the pipeline's trigger)")
    s.add_argument("source", help="a training JSON, an eval_data benchmark folder or a folder of videos")
    s.add_argument("--root", help="folder that media paths in a training JSON are relative to (default: its folder)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_index_media)

    s = sub.add_parser("plan-parts", help="cut a training JSON into parts sharded by separate jobs (scatter)")
    s.add_argument("json", help="a training JSON")
    s.add_argument("--root", help="folder that media paths in a training JSON are relative to (default: its folder)")
    add_setting(s, "--items-per-part", ShardsSection, "items_per_part")
    s.add_argument("--out", required=True, help="plan folder: parts.json and each part's JSON and media index")
    s.set_defaults(func=cmd_plan_parts)

    s = sub.add_parser("gather-shards", help="gather shard folders written part by part into one (gather)")
    s.add_argument("parts", nargs="+", help="the parts' shard folders, in order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_gather_shards)

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
    for name in ("dtype", "batch_size", "device"):
        add_setting(s, "--" + name.replace("_", "-"), ExtractSettings, name)
    s.add_argument(
        "--shard-range",
        metavar="A:B",
        help="only the folder's shards A to B-1 (0-based; B may pass the end): a part cache for gather-features",
    )
    s.add_argument("--no-progress", action="store_true")
    add_compute_options(s)
    add_launch_options(s)
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("gather-features", help="gather part caches of one encoder into one feature cache (gather)")
    s.add_argument(
        "parts", nargs="+", help="the part caches (merv features of each shard part, or --shard-range), in order"
    )
    s.add_argument("--shards", required=True, help="the shard folder the cache is of (the gathered split)")
    s.add_argument("--out", required=True, help="cache folder")
    s.set_defaults(func=cmd_gather_features)

    s = sub.add_parser("eval", help="evaluate a checkpoint on one sharded benchmark (or one chunk of it)")
    s.add_argument("--model", required=True, help="checkpoint folder")
    s.add_argument("--data", required=True, help="shard folder of the benchmark")
    s.add_argument("--name", help="benchmark name, looked up in the registry (default: the shard folder's name)")
    s.add_argument("--out", required=True, help="result JSON (rows, summary, manifest)")
    for name in ("mcq", "batch_size", "max_new_tokens", "num_chunks"):
        add_setting(s, "--" + name.replace("_", "-"), EvalSection, name)
    s.add_argument("--chunk-index", type=int, default=0, help="... and evaluate chunk K (0-based)")
    add_setting(s, "--limit", EvalSection, "limit")
    add_setting(s, "--cache", EvalSection, "cache_dir")
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
    for name in ("url", "model", "preset", "api_key_env", "api_key_file"):
        add_setting(g, "--judge-" + name.replace("_", "-"), JudgeSection, name, layered=True)
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
    add_setting(g, "--judge-concurrency", JudgeSection, "concurrency", layered=True)
    add_setting(g, "--judge-timeout", JudgeSection, "timeout_s", layered=True)
    add_setting(g, "--judge-max-attempts", JudgeSection, "max_attempts", layered=True)
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
    s.add_argument("--seed", type=int, help="the seed the model was trained under (recorded for collect-seeds)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_collect)

    s = sub.add_parser("collect-seeds", help="a model's eval.json over its seeds (each from merv collect --seed)")
    s.add_argument("results", nargs="+", help="each seed's eval.json")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_collect_seeds)

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
    for flag, metavar, help_ in (
        ("--allowed-host", "NAME", "a Host name clients use besides localhost (repeatable; needed with a non-loopback "
         "--host; '*': any)"),
        ("--allowed-dir", "DIR", "a folder file:// video URLs may point into, listed by the chat page (repeatable)"),
        ("--allowed-media-domain", "NAME", "a host name http(s):// media may come from (repeatable; exact names; "
         "default: none, http(s) off)"),
        ("--allowed-media-network", "CIDR", "a private network the allowed media names may resolve into, e.g. an "
         "intranet 10.1.0.0/16 (repeatable)"),
    ):  # fmt: skip
        s.add_argument(flag, action="append", default=[], metavar=metavar, help=help_)
    for flag, name, kind, help_ in (
        ("--max-media-redirects", "max_media_redirects", int, "redirects followed per media URL, each checked like "
         "the URL"),
        ("--max-frame-pixels", "max_frame_pixels", int, "width x height of one frame, from its header before decoding"),
        ("--max-request-pixels", "max_request_pixels", int, "pixels of all frames a request makes the server decode"),
        ("--max-upload-mb", "max_upload_mb", float, "largest video or frame set per request: data URL, download or "
         "upload"),
    ):  # fmt: skip
        default = getattr(Serve, name)
        s.add_argument(flag, type=kind, default=default, help=f"{help_} (default {default:g})")
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
    for s in sub.choices.values():  # -v / -q after the subcommand's name too
        add_verbosity(s, default=argparse.SUPPRESS)
    return p


def add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """``-v`` (debug logging, and a traceback on errors) and ``-q`` (warnings and errors only, no progress bars).
    A subcommand's copies default to SUPPRESS, so that ``merv -v eval`` keeps the ``-v`` given before it."""
    g = parser.add_argument_group("output").add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging, tracebacks")
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only, no progress")


def add_compute_options(s: argparse.ArgumentParser, workers: bool = False) -> None:
    """``--threads`` / ``--isa`` (config ``compute``) of a command that computes: applied by :func:`main` before
    anything runs (merv.runtime.reproducible), so its float results are the same bytes in every run."""
    g = s.add_argument_group("compute (config `compute`: what the float results depend on)")
    add_setting(g, "--threads", ComputeSection, "threads")
    add_setting(g, "--isa", ComputeSection, "isa")
    if workers:
        add_setting(g, "--workers", ComputeSection, "loader_workers")


def add_launch_options(s: argparse.ArgumentParser) -> None:
    """How a job runs: in this process (or under torchrun), or submitted through submitit."""
    g = s.add_argument_group("launch (submitit)")
    for name in ("launcher", "nodes", "tasks_per_node", "gpus_per_node"):
        add_setting(g, "--" + name.replace("_", "-"), LaunchSection, name)
    g.add_argument("--cpus-per-task", type=int, default=1)
    for name in ("partition", "account"):
        add_setting(g, "--" + name, LaunchSection, name)
    add_setting(g, "--time", LaunchSection, "time_min")
    g.add_argument("--submitit-dir", default="results/submitit", help="submitit's job folders and logs")


def add_setting(parser, flag: str, record: type, name: str, *, layered: bool = False, **kwargs) -> argparse.Action:
    """An option whose default, type or choices, and help come from the field ``name`` of a settings record
    (:mod:`merv.settings`); ``kwargs`` add to or override them. The action's ``config_key`` names the pipeline
    config key it stands for (``tests/test_settings.py`` compares the defaults). ``layered``: the option's own
    default is None, because a value given nowhere else comes from the environment or the config file first; the
    help still names the field's default, which applies last."""
    field = next(f for f in dataclasses.fields(record) if f.name == name)
    hint = typing.get_type_hints(record)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(hint) if a is not type(None)] if optional else [hint]
    if typing.get_origin(options[0]) is typing.Literal:
        kwargs.setdefault("choices", list(typing.get_args(options[0])))
    elif options[0] is bool:
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    else:
        kwargs.setdefault("type", options[0])
    default = field.default
    shown = "" if default is None else f" (default {default})"
    kwargs.setdefault("help", (field.metadata.get("help", "") + shown).replace("%", "%%"))
    action = parser.add_argument(flag, default=None if layered else default, **kwargs)
    section = next((key for key, cls in SECTIONS.items() if cls is record), None)
    action.config_key = f"{section}.{name}" if section else None
    action.layered = layered
    return action


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    if args.command != "fetch-weights":  # only fetch-weights downloads: every other command stays offline
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command not in WITHOUT_HF:
        quiet_hf(args)
    # the HTTP clients' request lines and headers stay out of the logs (they may carry a judge's API key)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if hasattr(args, "threads"):  # a command that computes: pinned before torch runs anything
            from merv.runtime import reproducible

            log.debug("compute settings: %s", reproducible(args.threads, args.isa))
        args.func(args)
    except Exception as e:
        if args.verbose or not isinstance(e, reported_errors()):
            raise
        print(f"merv {args.command}: error: {e}", file=sys.stderr)
        return 1
    log.info("merv %s: %s", args.command, resource_line())
    return 0


# Commands that never load a Hugging Face library: their start-up skips setting those up (importing transformers
# takes about a second), which counts in the many small jobs a scattered split is sharded in (issue 22).
WITHOUT_HF = {"synth", "shard", "index-media", "plan-parts", "gather-shards", "inspect"}
# The errors a command reports in one line, without a traceback, by the module that defines each.
REPORTED = {"merv.data.video": "VideoError", "merv.data.items": "DataFormatError",
            "merv.eval.judge": "JudgeUnavailable", "merv.train.launch": "JobFailed"}  # fmt: skip


def reported_errors() -> tuple[type[BaseException], ...]:
    """:data:`REPORTED`'s classes among the modules loaded (an error of a module the command never imported cannot
    have been raised; importing them all would add to every command's start-up), and bad values and paths."""
    loaded = [getattr(sys.modules[module], name) for module, name in REPORTED.items() if module in sys.modules]
    return (FileNotFoundError, ValueError, *loaded)


def quiet_hf(args) -> None:
    """Hugging Face libraries log errors only, and show no progress bars except fetch-weights' downloads."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.command == "fetch-weights" and not args.quiet:  # downloads show their progress (not their log lines)
        enable_progress_bars()  # still off under HF_HUB_DISABLE_PROGRESS_BARS=1
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        disable_progress_bars()


def resource_line() -> str:
    """CPU seconds (user + system, this process and the children it waited for) and peak memory: what a job cost,
    which, unlike its wall time, barely depends on what else runs on the machine (benchmarks/pipeline_timing.py)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return f"cpu {cpu:.1f} s, max rss {max(own.ru_maxrss, children.ru_maxrss) / 1024:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
