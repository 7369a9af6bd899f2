"""The video Hiera as a merv encoder, run by its authors' own code: the ``hiera`` package (PyPI ``hiera-transformer``,
the optional extra ``merv[hiera]``), as the original MERV runs it.

A folder is what ``Hiera.save_pretrained`` writes and the hub holds (e.g.
``facebook/hiera_base_plus_16x224.mae_k400_ft_k400``): ``config.json`` with the constructor's arguments and
``model.safetensors``. merv builds ``hiera.Hiera(**config)`` and loads every tensor strictly (the hub mixin's own
loader is not strict). Features are taken where the original's Hiera backbone takes them: the video is cut into
views of the checkpoint's clip length (``input_size[0]``, 16 for the Kinetics models; the original hardcodes 16), each
view runs through ``forward(x, return_intermediates=True)`` and the last stage's output ``[V, T', H', W', C]`` (no final
norm, no pooling) is kept, the views' time steps concatenated in order: ``[B, views x T', H' x W', C]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merv.config import EncoderConfig
from merv.models.backbone import VisualEncoder, read_checkpoint


def import_hiera():
    try:
        from hiera import Hiera
    except ImportError:
        raise ImportError(
            "encoder kind 'hiera_video' runs the hiera package: pip install 'merv[hiera]' (PyPI hiera-transformer)"
        ) from None
    return Hiera


class HieraVideoEncoder(VisualEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        path = Path(cfg.weights)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder {cfg.id!r}: no Hiera config.json in {path}")
        config = json.loads((path / "config.json").read_text())
        input_size = list(config.get("input_size", (224, 224)))
        if len(input_size) != 3:
            raise ValueError(f"encoder {cfg.id!r}: {path} is an image Hiera (input_size {input_size}), not a video one")
        clip = input_size[0]
        if input_size[1:] != [cfg.image_size, cfg.image_size]:
            raise ValueError(
                f"encoder {cfg.id!r}: config asks for {cfg.image_size}px but {path} is built for "
                f"{input_size[1]}x{input_size[2]}px"
            )
        if cfg.num_frames % clip:
            raise ValueError(
                f"encoder {cfg.id!r}: num_frames {cfg.num_frames} is not a multiple of the {clip}-frame views {path} "
                f"is built for (a video runs as views of {clip} frames): use {clip}, {2 * clip}, ..."
            )
        if cfg.feature_layer is not None:
            raise ValueError(
                f"encoder {cfg.id!r}: a Hiera's features are its last stage's output, as the original takes them; "
                f"set feature_layer to null (got {cfg.feature_layer})"
            )
        self.model = import_hiera()(**config)
        try:
            self.model.load_state_dict(read_checkpoint(path))
        except RuntimeError as e:  # names every missing, unexpected and mis-shaped tensor
            why = " ".join(str(e).split())  # one line
            raise ValueError(f"encoder {cfg.id!r}: {path} does not fit the Hiera of its config.json: {why}") from None
        stride = self.model.patch_stride  # (t, h, w) of the patch embedding
        pooled = [s**self.model.q_pool for s in self.model.q_stride]  # what the q-pooling stages divide by
        self.clip_frames = clip
        self.steps_per_view = clip // stride[0] // pooled[0]
        self.embed_dim = self.model.blocks[-1].dim_out
        self.temporal_positions = cfg.num_frames // clip * self.steps_per_view
        self.tokens_per_frame = (cfg.image_size // stride[1] // pooled[1]) * (cfg.image_size // stride[2] // pooled[2])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        views = video.reshape(b * t // self.clip_frames, self.clip_frames, *video.shape[2:]).transpose(1, 2)
        last = self.model(views.contiguous(), return_intermediates=True)[1][-1]  # [B*V, T', H', W', C]
        steps = t // self.clip_frames * self.steps_per_view
        return last.reshape(b, steps, self.tokens_per_frame, last.shape[-1])  # [B, T', N, C], views in order
