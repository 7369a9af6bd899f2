"""Feature cache (issue 9): what caching the frozen encoders' outputs buys, printed as ratios from one run.

    python benchmarks/features.py                  # CPU: merv-tiny end to end, and 4 vs 1 encoders (toy stand-ins)
    python benchmarks/features.py --scale 1b       # + on a GPU: the 1.1B LLM with the paper's 4 real-size encoders

1. merv-tiny, stage 1 (align: projectors + fusion learn, LLM and encoders frozen), on the synthetic data: the real
   training loop (``train_stage``, DataLoader included) once with both encoders on the fly and once from their
   caches; the median step time of each, and their ratio. Also the extraction throughput and bytes per sample.
2. The step with cached features, 4 encoders (merv-frozen's families as toy stand-ins) vs 1 (siglip-single's),
   same LLM: what the extra encoders cost once they no longer run.
3. ``--scale 1b`` on a GPU: ``benchmarks/train_step.py``'s model (1.1B Llama, merv-frozen's encoders at real size),
   the stage-2 step with encoders on the fly vs their pooled outputs given, and 4 vs 1 encoder(s) with cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def step_seconds(out: Path) -> list[float]:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prev, seconds = 0, []
    for s in steps:
        seconds.append((s["samples"] - prev) / s["samples_per_s"])
        prev = s["samples"]
    return seconds


def tiny_end_to_end(tmp: Path, train_videos: int, epochs: int) -> dict:
    from merv.config import resolve_run_config
    from merv.data.shards import ShardSettings, collect_items, write_shards
    from merv.data.synth import tokenizer_corpus, write_dataset
    from merv.features.extract import ExtractSettings, extract_features
    from merv.models.tiny import build_tiny_weights
    from merv.train.loop import train_stage
    from merv.weights import resolve_model

    write_dataset(tmp / "synth", seed=0, train_videos=train_videos, eval_videos=4)
    weights = tmp / "weights"
    overrides = {
        "model": {
            "encoders": {
                "vit": {"weights": str(weights / "vit" / "model.safetensors")},
                "vivit": {"weights": str(weights / "vivit")},
            },
            "llm": {"weights": str(weights / "llm")},
        },
        "train": {"stages": {"align": {"epochs": epochs, "num_workers": 1, "checkpoint_every": 0}}},
    }
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus())
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=2_000_000)
    write_shards(collect_items(tmp / "synth" / "train" / "align.json"), tmp / "shards", settings, workers=2)
    model = resolve_model(run.model)
    caches, extraction = {}, {}
    for enc in model.encoders:
        start = time.perf_counter()
        manifest = extract_features(tmp / "shards", model, enc.id, tmp / "features" / enc.id, ExtractSettings("fp32"))
        seconds = time.perf_counter() - start
        caches[enc.id] = tmp / "features" / enc.id
        extraction[enc.id] = {
            "samples_per_s": round(manifest["samples"] / seconds, 1),
            "bytes_per_sample": manifest["bytes_per_sample"],
            "shape": manifest["shape"],
        }
    fly = train_stage(run, "align", tmp / "shards", tmp / "fly", progress=False)
    cached = train_stage(run, "align", tmp / "shards", tmp / "cached", progress=False, features=caches)
    # the first steps warm up (worker start, first allocations): compare the steady state
    fly_s = statistics.median(step_seconds(tmp / "fly")[2:])
    cached_s = statistics.median(step_seconds(tmp / "cached")[2:])
    return {
        "steps": fly["step"],
        "global_batch": run.train.stage("align").global_batch_size,
        "step_s_on_the_fly": round(fly_s, 4),
        "step_s_cached": round(cached_s, 4),
        "cached_speedup": round(fly_s / cached_s, 2),
        "stage_s_on_the_fly": fly["seconds"],
        "stage_s_cached": cached["seconds"],
        "extraction": extraction,
    }


def step_medians(cases: dict[str, tuple], steps: int, warmup: int, device: str, bf16: bool) -> dict[str, float]:
    """Median seconds of forward + backward + optimizer step for each ``name: (model, batch)``, the cases taking
    turns step by step, so that a busy machine slows them alike."""
    from merv.train.strategy import make_optimizer

    optimizers = {name: make_optimizer(model, _stage()) for name, (model, _) in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + steps):
        for name, (model, batch) in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                loss, n, _ = model(**batch)
            (loss / n).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _stage():
    from merv.config import StageConfig

    return StageConfig(name="b", data="b", trainable=("projectors", "fusion"), lr=1e-4)


def pooled_batch(model, batch: int, text: int, device: str) -> dict:
    """A stage batch with every encoder's cached (pooled) features given, as a feature cache provides them."""
    from merv.train.loop import set_trainable

    set_trainable(model, ("projectors", "fusion"))
    grid = model.cfg.projector.visual_tokens
    features = {n: torch.randn(batch, grid, e.embed_dim, device=device) for n, e in model.encoders.items()}
    vocab = len(model.tokenizer)
    ids = torch.randint(4, vocab, (batch, text), device=device)
    if model.tokenizer.bos_token_id is not None:
        ids[:, 0] = model.tokenizer.bos_token_id
    labels = ids.clone()
    labels[:, : text // 2] = -100
    return {
        "videos": {},
        "input_ids": ids,
        "labels": labels,
        "lengths": torch.full((batch,), text, device=device),
        "has_video": torch.ones(batch, dtype=torch.bool),
        "features": features,
    }


def four_vs_one(tmp: Path, steps: int, batch: int, llm_width: int) -> dict:
    """merv-frozen's 4 encoder families vs siglip-single's 1 (toy stand-ins), both on one Llama of ``llm_width``, with
    every encoder's pooled features given: the extra encoders then cost a projector head each and the fusion. The
    LLM must not be a toy itself for the ratio to mean anything (at 7B the heads are ~0.3% of the LLM's FLOPs)."""
    import dataclasses

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from merv.config import resolve_run_config
    from merv.models.merv import MERV
    from merv.models.standins import build_standin_weights

    cases, llm_dir = {}, tmp / "llm"
    for preset in ("merv-frozen", "siglip-single"):
        run = build_standin_weights(resolve_run_config(preset), tmp / preset)
        if not llm_dir.exists():
            tokenizer = AutoTokenizer.from_pretrained(run.model.llm.weights)
            heads = llm_width // 64
            config = LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=llm_width, intermediate_size=int(2.75 * llm_width),
                num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            LlamaForCausalLM(config).save_pretrained(llm_dir)
            tokenizer.save_pretrained(llm_dir)
        llm = dataclasses.replace(run.model.llm, weights=str(llm_dir))
        torch.manual_seed(0)
        model = MERV.from_config(dataclasses.replace(run.model, llm=llm))
        cases[preset] = (model, pooled_batch(model, batch, 128, "cpu"))
    times = step_medians(cases, steps, 2, "cpu", False)
    return {
        "llm_width": llm_width,
        "step_s_4_encoders": round(times["merv-frozen"], 4),
        "step_s_1_encoder": round(times["siglip-single"], 4),
        "ratio": round(times["merv-frozen"] / times["siglip-single"], 3),
    }


def gpu_1b(tmp: Path, steps: int, batch: int, scale: str = "1b", device: str = "cuda") -> dict:
    """The 1.1B LLM with merv-frozen's encoders at real size: stage-2 step on the fly vs from pooled features
    (``scale="toy"``, ``device="cpu"``: the same at toy size, for ``benchmarks/gpu_check.py --dry-run``)."""
    import dataclasses

    from train_step import build

    from merv.models.merv import MERV
    from merv.train.loop import set_trainable

    run = build(scale, tmp)
    model = MERV.from_config(run.model).to(device)
    set_trainable(model, ("projectors", "fusion", "llm"))
    cached = pooled_batch(model, batch, 128, device)
    set_trainable(model, ("projectors", "fusion", "llm"))
    fly = dict(cached, features=None)
    fly["videos"] = {
        n: torch.randn(batch, e.num_frames, 3, e.image_size, e.image_size, device=device)
        for n, e in model.encoders.items()
    }
    one = dict(cached, features={"siglip": cached["features"]["siglip"]})
    from merv.config import FusionConfig

    siglip = tuple(e for e in model.cfg.encoders if e.id == "siglip")
    single_cfg = dataclasses.replace(model.cfg, encoders=siglip, fusion=FusionConfig(kind="single"))
    single = MERV(single_cfg, model.llm, model.tokenizer, {"siglip": model.encoders["siglip"]}).to(device)
    set_trainable(single, ("projectors", "fusion", "llm"))
    cases = {"fly": (model, fly), "cached": (model, cached), "one": (single, one)}
    times = step_medians(cases, steps, min(3, steps), device, True)
    t_fly, t_cached, t_one = times["fly"], times["cached"], times["one"]
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "batch": batch,
        "step_s_on_the_fly": round(t_fly, 4),
        "step_s_cached": round(t_cached, 4),
        "cached_speedup": round(t_fly / t_cached, 2),
        "step_s_cached_1_encoder": round(t_one, 4),
        "ratio_4_vs_1_cached": round(t_cached / t_one, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "1b"], default="tiny")
    p.add_argument("--train-videos", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--llm-width", type=int, default=512, help="hidden size of the LLM of the 4 vs 1 encoder step")
    args = p.parse_args()
    torch.manual_seed(0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["tiny_stage1_end_to_end"] = tiny_end_to_end(tmp / "tiny", args.train_videos, args.epochs)
        result["cached_4_vs_1_encoders_cpu"] = four_vs_one(tmp / "toy", args.steps, args.batch, args.llm_width)
        if args.scale == "1b":
            if not torch.cuda.is_available():
                raise SystemExit("--scale 1b needs a GPU")
            result["gpu_1b"] = gpu_1b(tmp / "1b", args.steps, args.batch)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
