"""Linear probes of the pretrained encoders: how well does each encoder's frozen output tell the benchmark's colour,
shape, first and last direction? The specialisation MERV's thesis needs, measured.

Two sets of clips, each from the probe's own seed (never the benchmark's clips nor a pretext's training data),
rendered in memory (no H.264, no JPEG):

- the *benchmark's* generator (:mod:`merv.data.synth`: four colours, three shapes of one size on a grey checkerboard,
  four directions, a turn half-way): ``colour``, ``shape``, ``first_direction``, ``last_direction``;
- the *pretext* generators (:mod:`merv.pretrain.data`, harder): ``pretext_shape``, one of eight shapes of random size
  and colour on a random texture, still (a single frame repeated), and ``pretext_direction``, one of eight compass
  directions or still, of a textured object over a textured background, the same all clip long (clips whose path
  turns are left out).

Each encoder sees them as MERV feeds it: its frame count sampled uniformly from the clip's 16 frames, through its own
transform.

Features: the encoder's output ``[T', N, C]`` averaged over the N patch tokens, its T' temporal positions kept
(concatenated: ``T' x C``), so that "first" and "last" direction stay tellable apart, as they are for MERV's
projectors, which pool space and keep time. A multinomial logistic regression per label (L2-regularised, full-batch
L-BFGS on standardised features, deterministic) is fitted on the training clips and scored on the test clips.

Every pretrained encoder is probed twice: as trained and at its random initialisation (the weights pretraining
started from), so the table shows what pretraining added.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from merv.data.synth import COLOURS, DIRECTIONS, QUESTIONS, SHAPES, render, sample_clip
from merv.data.video import sample_frame_indices
from merv.models.encoders import VisualEncoder, build_encoder
from merv.models.tiny import init_encoder, save_encoder
from merv.pretrain import data as pretext
from merv.pretrain.config import PretrainConfig, ProbeSettings

LABELS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "first_direction": tuple(DIRECTIONS),
    "last_direction": tuple(DIRECTIONS),
    "pretext_shape": pretext.SHAPES,
    "pretext_direction": pretext.DIRECTIONS,
}
BENCHMARK_LABELS = ("colour", "shape", "first_direction", "last_direction")
ATTRIBUTE = {qtype: attr for qtype, (_, _, attr) in QUESTIONS.items()}  # label -> Clip attribute


def probe_clips(settings: ProbeSettings) -> tuple[list, np.ndarray]:
    """The probe's clips and their frames ``[n, T, S, S, 3]`` uint8 (training clips first)."""
    rng = random.Random(settings.seed)
    travel = settings.size // 5
    clips = [
        sample_clip(rng, f"probe_{i:05d}", settings.size, travel)
        for i in range(settings.train_clips + settings.test_clips)
    ]
    frames = np.stack([render(c, settings.size, settings.frames, travel) for c in clips])
    return clips, frames


def pretext_clips(settings: ProbeSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{label: (frames [n, T, S, S, 3], classes [n])}`` of the pretext generators' probe sets (training clips
    first): still clips of one of eight shapes, and clips moving one way (or still) all along."""
    n, size = settings.train_clips + settings.test_clips, settings.size
    shapes = pretext.appearance_batch(np.random.default_rng([settings.seed, 1]), n, size, grid=4)
    rng, frames, directions = np.random.default_rng([settings.seed, 2]), [], []
    while sum(len(f) for f in frames) < n:
        batch = pretext.motion_batch(rng, 64, size, settings.frames, tubelet=2, grid=4)
        straight = (batch.labels["direction"] == batch.labels["direction"][:, :1]).all(axis=1)
        frames.append(batch.frames[straight])
        directions.append(batch.labels["direction"][straight, 0])
    return {
        "pretext_shape": (shapes.frames, shapes.labels["shape"]),  # one frame: every sampled frame is it
        "pretext_direction": (np.concatenate(frames)[:n], np.concatenate(directions)[:n]),
    }


@torch.no_grad()
def encoder_features(encoder: VisualEncoder, frames: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """``[n, T' * C]``: each clip's encoder output, averaged over the patch tokens, temporal positions concatenated."""
    encoder.eval()
    index = sample_frame_indices(frames.shape[1], encoder.num_frames)
    out = []
    for lo in range(0, len(frames), batch_size):
        video = torch.stack([encoder.transform(clip[index]) for clip in frames[lo : lo + batch_size]])
        out.append(encoder(video).mean(dim=2).flatten(1))  # [B, T', N, C] -> [B, T' * C]
    return torch.cat(out).double()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """Weights ``[D + 1, K]`` of a multinomial logistic regression (bias last), L-BFGS to convergence."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(x1.shape[1], classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x1 @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def probe_accuracy(features: torch.Tensor, labels: np.ndarray, classes: int, n_train: int, l2: float) -> float:
    """Test accuracy of a linear probe fitted on the first ``n_train`` rows (features standardised by their stats)."""
    train, test = features[:n_train], features[n_train:]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    y = torch.as_tensor(labels, dtype=torch.long)
    w = fit_logistic((train - mean) / std, y[:n_train], classes, l2)
    logits = torch.cat([(test - mean) / std, torch.ones(len(test), 1, dtype=test.dtype)], dim=1) @ w
    return float((logits.argmax(1) == y[n_train:]).double().mean())


def random_init(spec: PretrainConfig, folder: Path) -> VisualEncoder:
    """The encoder pretraining ``spec`` started from (same seed, same initialisation), saved under ``folder``."""
    enc = spec.encoder_config(folder)
    torch.manual_seed(spec.seed)
    save_encoder(enc, init_encoder(enc))
    return build_encoder(enc)


def probe_encoders(
    specs: dict[str, PretrainConfig], root: str | Path, settings: ProbeSettings, scratch: str | Path
) -> list[dict]:
    """One row per encoder and state (``pretrained`` from ``root/<name>``, ``random init`` built in ``scratch``):
    test accuracy of each label's probe."""
    clips, frames = probe_clips(settings)
    sets = [
        (frames, {k: np.array([LABELS[k].index(getattr(c, ATTRIBUTE[k])) for c in clips]) for k in BENCHMARK_LABELS})
    ]
    sets += [(f, {label: y}) for label, (f, y) in pretext_clips(settings).items()]
    rows = []
    for name, spec in specs.items():
        trained = build_encoder(spec.encoder_config(Path(root) / name))
        for state, encoder in (("pretrained", trained), ("random init", random_init(spec, Path(scratch) / name))):
            row = {"encoder": name, "architecture": f"{spec.preset}:{spec.encoder}", "task": spec.task, "state": state}
            for clip_frames, labels in sets:
                feats = encoder_features(encoder, clip_frames, settings.batch_size)
                for label, y in labels.items():
                    acc = probe_accuracy(feats, y, len(LABELS[label]), settings.train_clips, settings.l2)
                    row[label] = round(acc, 4)
            rows.append(row)
    return rows


def chance(settings: ProbeSettings) -> dict[str, float]:
    return {label: round(1 / len(values), 4) for label, values in LABELS.items()}


def write_probe(rows: list[dict], settings: ProbeSettings, out: str | Path) -> list[Path]:
    """``probe.csv``, ``probe.md`` and ``probe.json`` (rows, settings, chance) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["encoder", "architecture", "task", "state", *LABELS]
    csv = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    (out / "probe.csv").write_text("\n".join(csv) + "\n")
    base = chance(settings)
    md = [
        "**Linear probes of the pretrained encoders** (test accuracy in %, frozen features, "
        f"{settings.train_clips} training / {settings.test_clips} test clips per label, seed {settings.seed}): "
        "colour, shape, first and last direction on clips of the benchmark's generator; pretext shape (8 shapes, "
        "random size, textured) and pretext direction (8 directions or still, textured) on clips of the pretext "
        "generators",
        "",
        "| encoder | task | state | " + " | ".join(f"{k.replace('_', ' ')}" for k in LABELS) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in LABELS) + " |",
    ]
    md += [f"| {r['encoder']} | {r['task']} | {r['state']} | " + " | ".join(f"{100 * r[k]:.1f}" for k in LABELS) + " |"
           for r in rows]  # fmt: skip
    md += ["| chance | | | " + " | ".join(f"{100 * base[k]:.1f}" for k in LABELS) + " |"]
    (out / "probe.md").write_text("\n".join(md) + "\n")
    report = {
        "rows": rows,
        "chance": base,
        "settings": dataclasses.asdict(settings),
        "labels": {k: list(v) for k, v in LABELS.items()},
    }
    (out / "probe.json").write_text(json.dumps(report, indent=1) + "\n")
    return [out / "probe.csv", out / "probe.md", out / "probe.json"]
