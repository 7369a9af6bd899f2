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
    if path.is_file():
        return run_config_from_dict(yaml.safe_load(path.read_text()), where=str(path))
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
    from merv.data.synth import tokenizer_corpus
    from merv.models.tiny import build_tiny_weights

    run = load_config_spec(args.config)
    written = build_tiny_weights(run, tokenizer_corpus(), seed=args.seed)
    if args.manifest:
        manifest = {"model": run.model.name, "seed": args.seed, "paths": [str(p) for p in written]}
        Path(args.manifest).parent.mkdir(parents=True, exist_ok=True)
        Path(args.manifest).write_text(json.dumps(manifest, indent=1))
    log.info("built tiny weights for %s: %s", run.model.name, ", ".join(map(str, written)))


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
            print(json.dumps(sample["meta"] | {"frames": list(sample["frames"].shape)}, indent=1))
            return
    raise ValueError(f"{args.dir}: no sample with key {args.sample!r}")


def cmd_train(args):
    from merv.train.loop import train_stage

    run = load_config_spec(args.config)
    run.train.stage(args.stage)  # an unknown stage fails here, before anything is submitted
    if args.launcher == "none":
        train_stage(
            run,
            args.stage,
            Path(args.data),
            Path(args.out),
            Path(args.init) if args.init else None,
            progress=not args.no_progress,
        )
        return
    from merv.train.launch import LaunchConfig, TrainJob, submit

    launch = LaunchConfig(
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
    job = TrainJob(run.to_dict(), args.stage, args.data, args.out, args.init)
    meta = submit(job, launch)
    log.info("stage %s finished on %d processes: final loss %.4f", args.stage, meta["processes"], meta["final_loss"])


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
            "concurrency": args.judge_concurrency,
            "timeout_s": args.judge_timeout,
            "max_attempts": args.judge_max_attempts,
        }
        cfg = resolve_judge_config(flags, section=section)
        judge = Judge(cfg) if cfg else None
    handle = CheckpointHandle(args.model, device=args.device, dtype=args.dtype)
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
    """Write JSON atomically (a temp file renamed into place), so a killed job never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
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

    benchmarks = {}
    for path in args.results:
        r = json.loads(Path(path).read_text())
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

    s = sub.add_parser("build-tiny", help="build random tiny weights for a config's encoders and LLM (no download)")
    s.add_argument("--config", required=True, help="preset name, YAML/JSON file, or inline JSON")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--manifest", help="write a JSON listing what was built (the pipeline's marker file)")
    s.set_defaults(func=cmd_build_tiny)

    s = sub.add_parser("shard", help="decode media once into WebDataset tars of pre-sampled frames")
    s.add_argument("inputs", nargs="+", help="training JSON files, eval_data benchmark folders or folders of videos")
    s.add_argument("--out", required=True)
    s.add_argument("--root", help="folder that media paths in a training JSON are relative to (default: its folder)")
    s.add_argument("--frames", type=int, nargs="+", required=True, help="frame counts of the encoders, e.g. 16 32")
    s.add_argument("--size", type=int, required=True, help="frame size stored (the largest encoder input size)")
    s.add_argument("--shard-size", type=parse_size, default="200MB", help="target size of a tar (default 200MB)")
    s.add_argument("--frame-format", choices=["jpg", "npy"], default="jpg", help="jpg (default) or lossless npy")
    s.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND, help="video decoder")
    s.add_argument("--workers", type=int, default=1, help="decoding processes")
    s.add_argument("--strict", action="store_true", help="fail on the first bad item instead of quarantining it")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_shard)

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
    s.add_argument("--no-progress", action="store_true")
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
    s.set_defaults(func=cmd_train)

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
    g = s.add_argument_group(
        "judge (open-ended)",
        "an OpenAI-compatible chat-completions endpoint; each setting also comes from MERV_JUDGE_URL, "
        "MERV_JUDGE_MODEL, MERV_JUDGE_PRESET, MERV_JUDGE_API_KEY_FILE or the eval.judge section of "
        "--pipeline-config. Without a URL open-ended answers are scored by exact match.",
    )
    g.add_argument("--judge-url", help="e.g. http://localhost:8000/v1 (vLLM, SGLang) or https://api.openai.com/v1")
    g.add_argument("--judge-model", help="model name (default: the one model the endpoint serves)")
    g.add_argument("--judge-preset", help="video-chatgpt (ours: temperature 0) or merv-original (max_tokens 500)")
    g.add_argument("--judge-api-key-env", help="environment variable holding the API key (default MERV_JUDGE_API_KEY)")
    g.add_argument("--judge-api-key-file", help="file holding the API key")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
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

    try:
        args.func(args)
    except (VideoError, DataFormatError, FileNotFoundError, ValueError, JudgeUnavailable) as e:
        if args.verbose:
            raise
        print(f"merv {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
