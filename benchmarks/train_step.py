"""Training-step throughput (issue 5): samples/s and tokens/s of the real train step, and MFU on a GPU.

    python benchmarks/train_step.py                      # CPU: merv-tiny, fp32
    python benchmarks/train_step.py --scale 1b           # GPU: ~1.1B Llama + the paper's four encoders, bf16

``--scale 1b`` builds, from configs with random weights, merv-frozen's four encoders at their real sizes
(LanguageBind-Video ViT-L/14 with temporal attention, DINOv2 ViT-L/14-reg4, ViViT-B 16x2, SigLIP ViT-B/16) and a
TinyLlama-sized LLM (2048 wide, 22 layers, ~1.1B parameters), then times stage-2 steps (projectors + fusion + LLM
trained, encoders frozen) on synthetic batches already on the device, so only the model is measured.
MFU = (6 x trainable LLM params x LLM tokens + 2 x encoder params x encoder tokens) / step time / peak bf16 FLOP/s.
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
from merv.train.loop import make_optimizer, set_trainable
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
            write_standin(folder, 224, 16, size="large")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "1b"], default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text", type=int, default=128, help="text tokens per sample")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the LLM")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"

    with tempfile.TemporaryDirectory() as tmp:
        run = build(args.scale, Path(tmp))
        model = MERV.from_config(run.model)
    set_trainable(model, ("projectors", "fusion", "llm"))
    model.to(device)
    if args.checkpointing:
        model.llm.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, run.train.stages[-1])

    vocab = len(model.tokenizer)
    videos = {
        n: torch.randn(args.batch, e.num_frames, 3, e.image_size, e.image_size, device=device)
        for n, e in model.encoders.items()
    }
    ids = torch.randint(4, vocab, (args.batch, args.text), device=device)
    ids[:, 0] = model.tokenizer.bos_token_id
    labels = ids.clone()
    labels[:, : args.text // 2] = -100
    lengths = torch.full((args.batch,), args.text, device=device)

    def step():
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss, n, _ = model(videos, ids, labels, lengths)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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

    llm_params = sum(p.numel() for p in model.llm.parameters())
    llm_tokens = args.batch * (args.text + run.model.visual_tokens)
    flops = model_flops(model, llm_tokens, args.batch)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "scale": args.scale,
        "llm_params": llm_params,
        "encoder_params": sum(p.numel() for p in model.encoders.parameters()),
        "batch": args.batch,
        "llm_tokens_per_step": llm_tokens,
        "step_s": round(seconds, 4),
        "samples_per_s": round(args.batch / seconds, 2),
        "llm_tokens_per_s": round(llm_tokens / seconds, 1),
        "model_tflops_per_s": round(flops / seconds / 1e12, 2),
    }
    if device == "cuda":
        peak = peak_flops()
        result["mfu"] = round(flops / seconds / peak, 4) if peak else None
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
