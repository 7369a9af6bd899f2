"""Training-step throughput (issues 5, 13): the plain and the fast path of the real step, as ratios from one run.

    python benchmarks/train_step.py                      # CPU: merv-tiny, fp32 (checks the script and the paths)
    python benchmarks/train_step.py --scale 1b           # GPU: ~1.1B Llama + the paper's four encoders, bf16
    python benchmarks/train_step.py --scale 1b --plan    # + the memory planner's table for batch x checkpointing
    python benchmarks/train_step.py --scale toy          # merv-frozen's encoder families and a Llama at toy size

``--scale 1b`` builds, from configs with random weights, merv-frozen's four encoders at their real sizes
(LanguageBind-Video ViT-L/14 with temporal attention, DINOv2 ViT-L/14-reg4, ViViT-B 16x2, SigLIP ViT-B/16) and a
TinyLlama-sized LLM (2048 wide, 22 layers, ~1.1B parameters), then times stage-2 steps (projectors + fusion + LLM
trained, encoders frozen) on synthetic batches already on the device, so only the model is measured. Every variant
goes through ``merv.train.strategy.Strategy``, the object the training loop uses:

- ``plain``: fp32 weights under bf16 autocast, foreach AdamW, the LM head over every position (the state before
  issue 13);
- ``fast``: bf16 parameters under FSDP2's mixed-precision policy (fp32 master weights), fused AdamW, the LM head on
  target positions only, Liger kernels when installed (``pip install '.[gpu]'``);
- ``fast+compile``: and ``torch.compile`` of each LLM block.

Each is timed with the encoders' pooled outputs given (the LLM step: what a feature cache feeds) and, for plain and
fast, with the encoders on the fly. MFU = (6 x LLM params x LLM tokens + 2 x encoder params x encoder tokens) / step
time / peak bf16 FLOP/s of the GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from merv.config import resolve_run_config, run_config_from_dict
from merv.models.merv import MERV
from merv.train.loop import set_trainable
from merv.train.metrics import model_flops, peak_flops


def build(scale: str, tmp: Path):
    if scale == "tiny":
        from merv.data.synth import tokenizer_corpus
        from merv.models.tiny import build_tiny_weights

        overrides = {
            "model": {
                "encoders": {
                    "vit": {"weights": str(tmp / "vit.safetensors")},
                    "vivit": {"weights": str(tmp / "vivit")},
                },
                "llm": {"weights": str(tmp / "llm")},
            }
        }
        run = resolve_run_config("merv-tiny", overrides)
        build_tiny_weights(run, tokenizer_corpus())
        return run
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from merv.models.standins import build_standin_weights, write_standin
    from merv.models.tiny import save_module

    run = build_standin_weights(resolve_run_config("merv-frozen"), tmp / "small")  # toy tokenizer + layout
    if scale == "toy":
        return run
    data = run.to_dict()
    import timm
    from transformers import VivitConfig, VivitModel

    for enc in data["model"]["encoders"]:  # real sizes, random weights
        folder = tmp / "real" / enc["id"]
        if enc["kind"] == "timm_image":
            enc["model_kwargs"] = {k: v for k, v in enc["model_kwargs"].items() if k == "img_size"}
            enc["weights"] = str(folder / "model.safetensors")
            save_module(
                timm.create_model(enc["arch"], pretrained=False, num_classes=0, **enc["model_kwargs"]), enc["weights"]
            )
        elif enc["kind"] == "hf_video":
            VivitModel(VivitConfig(num_frames=32, image_size=224)).save_pretrained(folder)
            enc["weights"] = str(folder)
        elif enc["kind"] == "languagebind_video":
            write_standin(folder, 224, 8, size="large")  # the real checkpoint: 8-frame clips
            enc["weights"] = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(data["model"]["llm"]["weights"])
    llm = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(llm).save_pretrained(tmp / "real" / "llm")
    tokenizer.save_pretrained(tmp / "real" / "llm")
    data["model"]["llm"]["weights"] = str(tmp / "real" / "llm")
    return run_config_from_dict(data)


VARIANTS = {
    "plain": {"mixed_precision": "bf16", "loss_logits": "all", "kernels": "plain", "compile": False},
    "fast": {"mixed_precision": "bf16", "loss_logits": "targets", "kernels": "liger", "compile": False},
    "fast+compile": {"mixed_precision": "bf16", "loss_logits": "targets", "kernels": "plain", "compile": True},
}


def make_batch(model, batch: int, text: int, device: str, cached: bool) -> dict:
    """A stage-2 batch on the device: frames for every encoder, or their pooled outputs (``cached``)."""
    vocab = len(model.tokenizer)
    ids = torch.randint(4, vocab, (batch, text), device=device)
    ids[:, 0] = model.tokenizer.bos_token_id
    labels = ids.clone()
    labels[:, : text // 2] = -100
    out = {
        "input_ids": ids,
        "labels": labels,
        "lengths": torch.full((batch,), text, device=device),
        "has_video": torch.ones(batch, dtype=torch.bool),
        "videos": {},
        "features": None,
    }
    grid = model.cfg.projector.visual_tokens
    for n, e in model.encoders.items():
        if cached:
            out.setdefault("features", {})
            out["features"] = {**(out["features"] or {}), n: torch.randn(batch, grid, e.embed_dim, device=device)}
        else:
            out["videos"][n] = torch.randn(batch, e.num_frames, 3, e.image_size, e.image_size, device=device)
    return out


def time_variant(run, variant: dict, args, device: str, cached: bool, fsdp: bool | None = None) -> dict:
    """Build the model, prepare it as the loop does for ``variant`` and time ``args.steps`` steps. ``fsdp=True`` on
    the CPU keeps the variant's bf16 and shards the model as one GPU would (FSDP2's policy; a dry run)."""
    import dataclasses

    from merv.train.distributed import Dist
    from merv.train.strategy import Strategy

    stage = dataclasses.replace(
        run.train.stages[-1], activation_checkpointing=args.checkpointing, trainable=("projectors", "fusion", "llm"),
        **{k: v for k, v in variant.items() if not (k == "kernels" and not liger_available(device))},
    )  # fmt: skip
    if device == "cpu":
        stage = dataclasses.replace(
            stage, kernels="plain", compile=False, **({} if fsdp else {"mixed_precision": "no"})
        )
    torch.manual_seed(0)
    model = MERV.from_config(run.model)
    set_trainable(model, stage.trainable)
    strategy = Strategy(stage, Dist(device=device), fsdp=fsdp)
    model = strategy.prepare(model)
    optimizer = strategy.optimizer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(model, args.batch, args.text, device, cached)

    def step():
        loss, _ = strategy.micro_step(model, batch, 1.0 / (args.batch * args.text / 2), last=True)
        strategy.clip(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    llm_tokens = args.batch * (args.text + run.model.visual_tokens)
    llm_params = sum(p.numel() for p in model.llm.parameters())
    out = {"step_s": round(seconds, 4), "llm_tokens_per_s": round(llm_tokens / seconds, 1)}
    peak = peak_flops()
    if peak:
        encoders = 0 if cached else model_flops(model, 0, args.batch)
        out["mfu_llm"] = round(6 * llm_params * llm_tokens / seconds / peak, 4)
        out["mfu"] = round((6 * llm_params * llm_tokens + encoders) / seconds / peak, 4)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def liger_available(device: str) -> bool:
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def memory_plan(run, text: int, model=None) -> list[dict]:
    """Peak GPU memory, estimated, for batch sizes with and without activation checkpointing (stage 2 with bf16
    parameters under FSDP2's policy, one GPU, encoders on the fly):

    - what trains (LLM, projectors, fusion): fp32 master weights and gradients, two fp32 AdamW moments and the bf16
      compute copy: 18 bytes a parameter;
    - the frozen encoders: fp32 weights and their bf16 copy (6 bytes a parameter); their activations are not kept;
    - the LLM's activations kept for backward, with SDPA/flash attention: ~34 x hidden bytes per token and layer
      (Korthikanti et al., 2022); with checkpointing only each layer's input (2 x hidden bytes) plus one layer
      recomputed at a time. The LM head runs on target positions only (half of the text here), in fp32.

    ``model``: the MERV to plan for (e.g. built on the meta device at full size); built from ``run`` when None.
    """
    from merv.models.merv import MERV

    model = model if model is not None else MERV.from_config(run.model)
    llm = model.llm.config
    hidden, layers, vocab = llm.hidden_size, llm.num_hidden_layers, llm.vocab_size
    trained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoders."))
    frozen = sum(p.numel() for p in model.encoders.parameters())
    states = 18 * trained + 6 * frozen
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        tokens = batch * (text + run.model.visual_tokens)
        logits = batch * text // 2 * vocab * 4
        for checkpointing in (False, True):
            acts = tokens * hidden * (2 * layers + 34) if checkpointing else tokens * hidden * 34 * layers
            rows.append({"batch": batch, "checkpointing": checkpointing,
                         "estimated_gib": round((states + acts + logits) / 2**30, 1)})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "toy", "1b"], default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text", type=int, default=128, help="text tokens per sample")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the LLM")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--plan", action="store_true", help="print the memory planner's table too")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.scale == "1b" and device != "cuda":
        raise SystemExit("--scale 1b needs a GPU")

    with tempfile.TemporaryDirectory() as tmp:
        run = build(args.scale, Path(tmp))
        result = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "scale": args.scale,
            "batch": args.batch,
            "llm_tokens_per_step": args.batch * (args.text + run.model.visual_tokens),
            "liger": liger_available(device),
        }
        for name in args.variants:
            if device == "cpu" and name != "plain":
                continue  # bf16 parameters, Liger and compile are GPU paths; the CPU tests compare their losses
            result[f"{name} (cached features)"] = time_variant(run, VARIANTS[name], args, device, cached=True)
            if name != "fast+compile":
                result[f"{name} (encoders on the fly)"] = time_variant(run, VARIANTS[name], args, device, cached=False)
        if "plain" in args.variants and "fast" in args.variants and device == "cuda":
            base = result["plain (cached features)"]["step_s"]
            result["speedup_fast_vs_plain"] = round(base / result["fast (cached features)"]["step_s"], 2)
            fly, cached = (result[f"fast ({k})"]["step_s"] for k in ("encoders on the fly", "cached features"))
            result["speedup_cached_vs_on_the_fly"] = round(fly / cached, 2)
        if args.plan:
            result["memory_plan"] = memory_plan(run, args.text)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
