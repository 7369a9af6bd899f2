"""Typed config of the ``pretrain_encoder`` stage, and how a model's encoders are pointed at pretrained weights.

A config ``pretrain.<name>`` entry trains one encoder *architecture* of a preset (``preset`` + ``encoder`` id) on a
pretext task; the result lives in ``data/weights/pretrained/<name>``. A model entry's ``pretrained_encoders:
{<encoder id>: <name>}`` makes that encoder load those weights; its architecture must be the one that was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from merv.config import EncoderConfig, ModelConfig, RunConfig, parse_config, resolve_run_config

PretextTask = Literal["appearance", "motion"]
PRETRAINED_DIR = "data/weights/pretrained"
TASK_ENCODER_KIND = {"appearance": "timm_image", "motion": "hf_video"}
# what must match between the trained encoder and a model's use of it: the shape of its weights. How a model feeds it
# (frames of a per-frame encoder, resize, feature layer, caching) may differ; a video model's frame count may not.
ARCHITECTURE = ("kind", "arch", "model_kwargs", "image_size")
VIDEO_ARCHITECTURE = (*ARCHITECTURE, "num_frames")


@dataclass(frozen=True)
class PretrainConfig:
    """One encoder of a preset, pretrained on a synthetic pretext task (config ``pretrain.<name>``)."""

    preset: str  # the preset whose encoder architecture is trained (e.g. merv-tiny)
    encoder: str  # that encoder's id
    task: PretextTask
    steps: int = 300
    batch_size: int = 32
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 1  # pretext data and initialisation; the benchmark's data never enters
    render_size: int = 64  # frames are rendered at this size, then resized by the encoder's own transform
    eval_samples: int = 256  # held-out pretext samples for the accuracy in pretext.json
    curve_points: int = 20  # times held-out accuracy is measured during training (the curve in pretext.json)
    # weight of each label's loss (default 1): the per-token maps and masks make patch tokens carry what the label
    # is, but summed with equal weights they crowd out the pooled shape label (docs/thesis.md)
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1 or self.curve_points < 1:
            raise ValueError("pretrain: steps, batch_size, eval_samples and curve_points must be >= 1")
        if self.lr <= 0 or self.render_size < 16:
            raise ValueError(f"pretrain: lr must be > 0 and render_size >= 16, got {self.lr}, {self.render_size}")
        from merv.pretrain.data import label_classes  # numpy and PIL only

        unknown = sorted(set(self.loss_weights) - set(label_classes(self.task)))
        if unknown:
            raise ValueError(
                f"pretrain: loss_weights names {unknown}, not labels of task {self.task!r} "
                f"(it has {sorted(label_classes(self.task))})"
            )
        if any(not isinstance(w, int | float) or w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"pretrain: loss_weights must be numbers >= 0, got {self.loss_weights}")

    def encoder_config(self, out: str | Path | None = None) -> EncoderConfig:
        """The encoder's config from the preset; with ``out``, its weights pointed at the pretrained copy there."""
        encoders = {e.id: e for e in resolve_run_config(self.preset).model.encoders}
        if self.encoder not in encoders:
            raise ValueError(
                f"pretrain: preset {self.preset!r} has no encoder {self.encoder!r}; it has {list(encoders)}"
            )
        enc = encoders[self.encoder]
        if enc.kind != TASK_ENCODER_KIND[self.task]:
            raise ValueError(
                f"pretrain: task {self.task!r} trains a {TASK_ENCODER_KIND[self.task]} encoder, but "
                f"{self.preset}:{self.encoder} is {enc.kind!r}"
            )
        return dataclasses.replace(enc, weights=str(weights_path(enc, out))) if out is not None else enc


def pretrain_config_from_dict(data: dict, where: str = "pretrain") -> PretrainConfig:
    return parse_config(PretrainConfig, data, where)


def weights_path(enc: EncoderConfig, out: str | Path) -> Path:
    """Where a pretrained encoder lives in its output folder: a timm file, or the transformers folder itself."""
    return Path(out) / "model.safetensors" if enc.kind == "timm_image" else Path(out)


def with_pretrained_encoders(
    run: RunConfig, use: dict[str, str], specs: dict[str, PretrainConfig], root: str = PRETRAINED_DIR
) -> RunConfig:
    """``run`` with the encoders named in ``use`` (encoder id -> pretrain name) reading the pretrained weights.

    Fails with the model, encoder and differing fields named when an encoder is not the architecture trained."""
    encoders = {e.id: e for e in run.model.encoders}
    replaced = {}
    for enc_id, name in use.items():
        where = f"model {run.model.name!r}: pretrained_encoders.{enc_id}"
        if enc_id not in encoders:
            raise ValueError(f"{where}: the model has no encoder {enc_id!r} (it has {list(encoders)})")
        if name not in specs:
            raise ValueError(f"{where}: no pretrain entry {name!r} in the config (it has {sorted(specs)})")
        trained, used = dataclasses.asdict(specs[name].encoder_config()), dataclasses.asdict(encoders[enc_id])
        fields = VIDEO_ARCHITECTURE if trained["kind"] == "hf_video" else ARCHITECTURE
        differ = [k for k in fields if trained[k] != used[k]]
        if differ:
            details = ", ".join(f"{k}: trained {trained[k]!r}, model {used[k]!r}" for k in differ)
            raise ValueError(f"{where}: encoder differs from the one pretrain.{name} trains ({details})")
        replaced[enc_id] = dataclasses.replace(
            encoders[enc_id], weights=str(weights_path(encoders[enc_id], f"{root}/{name}"))
        )
    model: ModelConfig = dataclasses.replace(
        run.model, encoders=tuple(replaced.get(e.id, e) for e in run.model.encoders)
    )
    return dataclasses.replace(run, model=model)


@dataclass(frozen=True)
class ProbeSettings:
    """How the pretrained encoders are probed (``merv probe``, merv.pretrain.probe)."""

    train_clips: int = 800
    test_clips: int = 400
    seed: int = 1234  # the probe's clips: not the benchmark's (config synth.seed) nor a pretext's
    size: int = 64  # rendered frame size (the benchmark's)
    frames: int = 16  # rendered frames per clip (the benchmark's)
    l2: float = 1e-3  # L2 weight of the logistic regression (on standardised features)
    batch_size: int = 64

    def __post_init__(self):
        if self.train_clips < 2 or self.test_clips < 1:
            raise ValueError(
                f"probe: need >= 2 training clips and >= 1 test clip, got {self.train_clips}, {self.test_clips}"
            )
