"""Why does an encoder learn its pretext task, or not? Train variants of one config `pretrain:` entry (encoder size,
patch size, steps, lr, ...) and print each one's held-out accuracy and wall time, from one run.

    python benchmarks/pretext_sweep.py appearance --variant base --variant patch8:patch_size=8 \\
        --variant wide:embed_dim=128,depth=4 --variant long:steps=3000 [--parallel 2] [--steps 1500]

A variant is ``name:key=value,...``: ``arch`` (a timm model name), keys of the encoder's ``model_kwargs`` (timm ViT:
patch_size, embed_dim, depth, num_heads, mlp_ratio; ViViT: hidden_size, num_hidden_layers, num_attention_heads,
intermediate_size, tubelet: its spatial patch) or of the
`pretrain` entry (steps, lr, batch_size, weight_decay, warmup_steps, render_size), or ``w_<label>``: the weight of a
label's loss (loss_weights). The entry is the one in
config/config.yaml. Variants run side by side, ``--parallel`` at a time, one compute thread each (--threads), so
their wall times compare as ratios only when they ran under the same load: the script prints the machine's load
average too. The held-out set is the pretext's own (its seed), the same for every variant. ``default:`` (no keys)
trains the entry as the config has it, the way the pipeline's ``merv pretrain`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_KEYS = {"steps", "lr", "batch_size", "weight_decay", "warmup_steps", "render_size", "eval_samples", "seed"}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``name:k=v,...`` -> (name, model_kwargs overrides, pretrain config overrides)."""
    name, _, spec = text.partition(":")
    arch, cfg = {}, {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        try:  # numbers as numbers ("2e-3" is a string to YAML 1.1)
            parsed = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            parsed = yaml.safe_load(value)
        if key.startswith("w_"):  # a loss weight: w_shape_map=0.2
            cfg.setdefault("loss_weights", {})[key[2:]] = parsed
        else:
            (cfg if key in CONFIG_KEYS else arch)[key] = parsed
    return name, arch, cfg


def run_variant(entry: dict, arch: dict, cfg: dict, out: Path, threads: int) -> dict:
    """Train one variant in this process (called by the child process of :func:`main`)."""
    from merv.runtime import reproducible

    reproducible(threads)  # as `merv pretrain --threads N --isa native` runs it, before torch computes anything

    from merv.pretrain import config as pconfig
    from merv.pretrain.train import train_encoder

    spec = pconfig.pretrain_config_from_dict({**entry, **cfg})
    original = pconfig.PretrainConfig.encoder_config

    def encoder_config(self, out=None):  # the preset's encoder with this variant's architecture
        enc = original(self, out)
        kwargs = {**enc.model_kwargs, **arch}
        if "arch" in kwargs:  # another timm architecture (e.g. a hybrid with a convolutional stem)
            enc = dataclasses.replace(enc, arch=kwargs.pop("arch"))
        if enc.kind == "hf_video" and "tubelet" in kwargs:
            t = kwargs.pop("tubelet")
            kwargs["tubelet_size"] = [2, t, t]
        return dataclasses.replace(enc, model_kwargs=kwargs)

    pconfig.PretrainConfig.encoder_config = encoder_config
    _, report = train_encoder(spec, out)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", help="name of a config `pretrain:` entry (appearance, motion)")
    parser.add_argument("--variant", action="append", required=True, help="name:key=value,... (see above)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="keep the trained variants here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    entry = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["pretrain"][args.entry]

    if args.child:  # one variant, in its own process
        name, arch, cfg = parse_variant(args.variant[0])
        start = time.time()
        report = run_variant(entry, arch, cfg, Path(args.child), args.threads)
        print(json.dumps({"held_out": report["held_out_accuracy"], "seconds": time.time() - start}))
        return 0

    root = Path(args.out or tempfile.mkdtemp(prefix="merv-pretext-"))
    pending, running, results = list(args.variant), [], {}
    start = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            variant = pending.pop(0)
            name = variant.partition(":")[0]
            cmd = [sys.executable, __file__, args.entry, "--variant", variant, "--threads", str(args.threads),
                   "--child", str(root / name)]  # fmt: skip
            running.append((variant, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), time.time()))
        time.sleep(2)
        for item in list(running):
            variant, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                lines = proc.stdout.read().strip().splitlines()
                results[variant] = (json.loads(lines[-1]) if proc.returncode == 0 else None, time.time() - t0)
                print(f"done {variant} ({os.getloadavg()[0]:.1f} load)", flush=True)

    pooled = ("shape", "hue") if args.entry == "appearance" or entry["task"] == "appearance" else ("direction",)
    print(f"\n| variant | {' | '.join(pooled)} | variant s | process s |\n|---|" + "---:|" * (len(pooled) + 2))
    for variant in args.variant:
        res, wall = results[variant]
        if res is None:
            print(f"| {variant} | failed |")
            continue
        accs = " | ".join(f"{res['held_out'][k]:.3f}" for k in pooled)
        print(f"| {variant} | {accs} | {res['seconds']:.0f} | {wall:.0f} |")
    print(f"\nall variants in {time.time() - start:.0f} s; outputs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
