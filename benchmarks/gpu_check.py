"""The GPU paths CI cannot run, checked and measured by one command on a lent GPU machine (a few minutes).

    python benchmarks/gpu_check.py              # one CUDA GPU (H100 / H200)
    python benchmarks/gpu_check.py --dry-run    # the same code on the CPU at toy size, in seconds (CI runs this)

1. Collectives: the one-process group merv makes on a GPU (``cpu:gloo,cuda:nccl``): an all-reduce of host values (the
   step's counts, the stop flag) and a barrier on gloo, a CUDA all-reduce on NCCL, the gradient norm of FSDP2-sharded
   parameters, and a DCP save and load of that model with its AdamW state (``merv.train.state``).
2. The stage-2 step of ``benchmarks/train_step.py --scale 1b`` (1.1B Llama, merv-frozen's four encoders at real
   size) in its ``fast`` variant: FSDP2 with the bf16 mixed-precision policy on the one-process NCCL group, fused
   AdamW, target-only logits (Liger when installed); with the encoders' outputs given and with the encoders on the
   fly: step time, MFU, and their ratio.
3. ``benchmarks/features.py`` on CUDA: extraction and the real training loop (``train_stage``: loader with pinned
   memory, copies to the GPU) on merv-tiny, cached vs on the fly; and the 1.1B step on the fly vs from pooled
   features, and 4 encoders vs 1.

Prints a table; ``--json FILE`` also writes every number. ``--dry-run`` runs each part on the CPU at toy size: the
same functions, with gloo for NCCL and merv-frozen's encoder families at toy size for the 1.1B model (FSDP2's bf16
policy on one CPU process, as one GPU runs it). What no single GPU can check (NCCL between ranks, FSDP2's sharding
over several GPUs) is listed in docs/gpu-paths.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def collectives(device: str, tmp: Path) -> dict:
    """merv's process group on this device, each kind of collective the training loop issues, and a DCP round trip
    of an FSDP2-sharded model with the bf16 policy; raises when anything disagrees."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from merv.data.loader import Position
    from merv.train.distributed import Dist, backend_for, ensure_process_group
    from merv.train.state import load_state, save_state

    d = Dist(device=device)
    ensure_process_group(d)  # what Strategy.prepare does on one GPU
    served = sorted(t.type for t in dist.group.WORLD._device_types)
    host = torch.tensor([3.0, 1.0], dtype=torch.float64)  # all_reduce_sums' tensor: counts, loss, stop flag
    dist.all_reduce(host)
    dist.barrier()
    on_device = torch.ones(4, device=device)
    dist.all_reduce(on_device)
    if host.tolist() != [3.0, 1.0] or on_device.sum().item() != 4:
        raise RuntimeError(f"all-reduce in a group of one changed its input: {host.tolist()}, {on_device.tolist()}")

    def sharded(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    model, optimizer, scheduler = sharded(0)
    model(torch.randn(16, 64, device=device)).float().square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    folder = save_state(tmp / "state", 1, model, optimizer, scheduler, Position(), {"fingerprint": "check"}, 1)
    again, optimizer2, scheduler2 = sharded(1)
    load_state(folder, again, optimizer2, scheduler2)
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in pairs)
    moments = [s["exp_avg"] for s in optimizer2.state.values()]
    if not same or not moments or any(m.dtype != torch.float32 for m in moments):
        raise RuntimeError("the DCP round trip lost weights or fp32 optimizer state")
    return {"backend": backend_for(device), "group serves": served, "grad_norm": round(norm, 4), "dcp": "ok"}


def train_steps(device: str, tmp: Path, dry_run: bool) -> dict:
    """train_step.py's model in the ``fast`` variant (FSDP2 bf16 policy), encoder outputs given and on the fly."""
    from train_step import VARIANTS, build, liger_available, time_variant

    scale = "toy" if dry_run else "1b"
    run = build(scale, tmp)
    args = argparse.Namespace(batch=2 if dry_run else 4, text=32 if dry_run else 128, steps=1 if dry_run else 8,
                              warmup=1 if dry_run else 3, checkpointing=False)  # fmt: skip
    out = {"scale": scale, "batch": args.batch, "liger": liger_available(device)}
    for cached in (True, False):
        key = "cached" if cached else "on_the_fly"
        out[key] = time_variant(run, VARIANTS["fast"], args, device, cached, fsdp=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    out["ratio_on_the_fly_vs_cached"] = round(out["on_the_fly"]["step_s"] / out["cached"]["step_s"], 2)
    return out


def features(device: str, tmp: Path, dry_run: bool) -> dict:
    """benchmarks/features.py: merv-tiny end to end (extraction, the real loop) and the real-size step."""
    from features import gpu_1b, tiny_end_to_end

    out = {"tiny_stage1": tiny_end_to_end(tmp / "tiny", 32 if dry_run else 256, 2)}
    steps = 1 if dry_run else 20
    out["stage2_step"] = gpu_1b(tmp / "big", steps, 2, "toy" if dry_run else "1b", device)
    return out


def table(result: dict) -> str:
    c, t, f = result["collectives"], result["train_step"], result["features"]

    def step(r: dict) -> str:
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        return f"{r['step_s']:.4f} s{mfu}"

    rows = [
        ("device", result["device"]),
        ("process group (one process)", f"{c['backend']}; serves {', '.join(c['group serves'])}"),
        ("host all-reduce + barrier, CUDA all-reduce, FSDP2 grad norm, DCP save/load", c["dcp"]),
        (f"stage-2 step {t['scale']}, FSDP2 bf16 policy, encoder outputs given", step(t["cached"])),
        (f"stage-2 step {t['scale']}, FSDP2 bf16 policy, encoders on the fly", step(t["on_the_fly"])),
        ("  on the fly / outputs given", f"{t['ratio_on_the_fly_vs_cached']}x"),
        ("merv-tiny stage 1, real loop: step on the fly / cached", f"{f['tiny_stage1']['cached_speedup']}x"),
        ("merv-tiny extraction, samples/s (vit, vivit)",
         ", ".join(str(e["samples_per_s"]) for e in f["tiny_stage1"]["extraction"].values())),
        ("stage-2 step (autocast): on the fly / from pooled features", f"{f['stage2_step']['cached_speedup']}x"),
        ("  from pooled features: 4 encoders / 1", f"{f['stage2_step']['ratio_4_vs_1_cached']}x"),
        ("seconds", f"{result['seconds']:.0f}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy size, in seconds")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (--dry-run runs the same code on the CPU)")
    device = "cpu" if args.dry_run else "cuda"
    start = time.time()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["collectives"] = collectives(device, tmp / "collectives")
        result["train_step"] = train_steps(device, tmp / "train_step", args.dry_run)
        result["features"] = features(device, tmp / "features", args.dry_run)
    result["seconds"] = time.time() - start
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
