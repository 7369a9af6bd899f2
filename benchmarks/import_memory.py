"""Memory of ``merv import-original`` (issue 18): its peak resident memory against the size of the checkpoint.

    python benchmarks/import_memory.py                       # float32 checkpoints of ~220 and ~400 MB (Llama width
                                                             # 1024, 4 and 8 blocks)
    python benchmarks/import_memory.py --merv-path /tmp/old  # the same measurement of another checkout's code
                                                             # (add --plain-vocab for code without the <PAD> step)

Builds merv-tiny's encoders and LLM folders (saved in float16, as Llama-2-7b-hf is), synthesises checkpoints in the
original MERV's layout of those models (tests/original.py: float32, as the original saves), then measures in fresh
processes the peak resident set (``VmHWM``: anonymous memory plus the file pages mapped in) of ``merv
import-original`` for each, and of Python with torch, transformers and merv's importer imported (``base``).

What the importer holds per byte of checkpoint is the slope ``(peak_large - peak_small) / (size_large -
size_small)``, free of the fixed costs (libraries, encoders): 1.0 is one copy of the weights (here: the memory-mapped
checkpoint's pages, touched as they are written out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb(code: str, merv_path: Path) -> float:
    """Peak resident set (MB) of ``python -c code`` run with ``merv_path`` first on the import path: the process's
    own high-water mark (``VmHWM``; ``ru_maxrss`` would carry over the parent's peak across ``exec``)."""
    probe = f"{code}\nimport re\nprint('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    env = {**os.environ, "PYTHONPATH": str(merv_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=merv_path)
    if res.returncode != 0:
        raise SystemExit(f"measured process failed:\n{res.stderr[-3000:]}")
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK ")]
    return int(line.split()[1]) / 1024  # kB


def build(tmp: Path, width: int, layers: int, plain_vocab: bool) -> tuple[Path, dict]:
    """The synthetic original checkpoint and the --config spec (a preset with overrides) that imports it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from merv.config import resolve_run_config
    from merv.data.synth import tokenizer_corpus
    from merv.models.merv import MERV
    from merv.models.tiny import build_tiny_weights
    from tests.conftest import tiny_overrides
    from tests.original import OriginalFusion, original_llm, original_projectors, original_state, save_original

    overrides = tiny_overrides(tmp / "weights")
    run = resolve_run_config("merv-tiny", overrides)
    build_tiny_weights(run, tokenizer_corpus(), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp / "weights" / "llm")
    llm_dir = tmp / "big-llm"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=int(width * 2.6875),  # Llama-2 7B's ratio (11008 / 4096)
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    attn_dim = width * 3 // 4  # as 3072 / 4096
    overrides["model"]["llm"] = {"weights": str(llm_dir)}
    overrides["model"]["fusion"] = {"attn_dim": attn_dim}
    if not plain_vocab:
        overrides["model"]["llm"] |= {"add_special_tokens": {"pad_token": "<PAD>"}, "pad_vocab_to_multiple_of": 64}
    widths = [e.embed_dim for e in MERV.from_config(resolve_run_config("merv-tiny", overrides).model).encoders.values()]
    backbone, _ = original_llm(llm_dir, pad=not plain_vocab)
    state = original_state(original_projectors(widths, width), backbone, OriginalFusion(attn_dim, width))
    del backbone
    return save_original(tmp / "latest-checkpoint.pt", state), {"preset": "merv-tiny", "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 8], help="LLM blocks of the two checkpoints")
    parser.add_argument("--merv-path", type=Path, default=REPO, help="checkout whose importer is measured")
    parser.add_argument("--plain-vocab", action="store_true", help="no <PAD> token (for code without that step)")
    args = parser.parse_args()
    base = peak_rss_mb("import torch, transformers, merv.convert, merv.models.merv", args.merv_path)
    sizes, peaks = [], []
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="merv-import-mem-") as tmp:
            tmp = Path(tmp)
            checkpoint, spec = build(tmp, args.width, layers, args.plain_vocab)
            argv = ["import-original", str(checkpoint), "--config", json.dumps(spec), "--out", str(tmp / "imported")]
            peaks.append(peak_rss_mb(f"from merv.cli import main\nassert main({argv!r}) == 0", args.merv_path))
            sizes.append(checkpoint.stat().st_size / 2**20)
    print(f"code measured: {args.merv_path}; base (imports only): peak RSS {base:.1f} MB")
    for layers, size, peak in zip(args.layers, sizes, peaks, strict=True):
        print(f"  {layers} blocks: checkpoint {size:7.1f} MB, import-original peak RSS {peak:7.1f} MB, "
              f"(peak - base) / checkpoint = {(peak - base) / size:.2f}")  # fmt: skip
    slope = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    print(f"memory per byte of checkpoint (slope): {slope:.2f} copies of the weights")


if __name__ == "__main__":
    main()
