"""LanguageBind's own video code (PyPI ``languagebind`` 0.1.0), run in its venv (transformers 4.x) by the parity tests.

    python languagebind_reference.py features CONFIG.json SEED OUT_FOLDER VIDEO.pt HIDDEN.pt [VIDEO.pt HIDDEN.pt ...]
        builds ``LanguageBindVideo`` from CONFIG with random weights (seeded), saves it with ``save_pretrained`` as the
        hub ships it (``pytorch_model.bin``, transformers 4.x: with ``vision_model.embeddings.position_ids``) into
        OUT_FOLDER, and writes to HIDDEN.pt the features the original MERV takes for VIDEO.pt ``[B, T, 3, S, S]``: its
        LanguageBind backbone feeds ``[B, 3, T, S, S]`` to ``vision_model`` with ``output_hidden_states=True`` and
        keeps ``hidden_states[-2]`` per frame without the CLS token -> ``[B, T, N, D]``.
    python languagebind_reference.py manifest CONFIG.json OUT.json
        the name and shape of every tensor ``save_pretrained`` writes for CONFIG, from a model built on the meta device.

Nothing here is merv's code: only LanguageBind's classes, the way the original MERV calls them.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch


def languagebind_video():
    """The video modules alone: the package's ``__init__`` imports every modality (torchaudio, pytorchvideo, ...)."""
    spec = importlib.util.find_spec("languagebind")
    package = types.ModuleType("languagebind")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["languagebind"] = package
    from languagebind.video.configuration_video import LanguageBindVideoConfig
    from languagebind.video.modeling_video import LanguageBindVideo

    return LanguageBindVideoConfig, LanguageBindVideo


def build(config_path: str):
    config_cls, model_cls = languagebind_video()
    config = config_cls(**json.loads(Path(config_path).read_text()))
    model = model_cls(config)
    for module in model.modules():  # a config built by hand leaves sub-configs without an attention implementation
        sub = getattr(module, "config", None)
        if sub is not None:
            sub._attn_implementation = "eager"
    return model


def features(config_path: str, seed: str, out: str, *videos_and_outputs: str) -> None:
    torch.manual_seed(int(seed))
    model = build(config_path).eval()
    model.save_pretrained(out, safe_serialization=False)
    for video_path, hidden_path in zip(videos_and_outputs[::2], videos_and_outputs[1::2], strict=True):
        video = torch.load(video_path)  # [B, T, 3, S, S]
        b, t = video.shape[:2]
        with torch.no_grad():
            hidden = model.vision_model(video.transpose(1, 2), output_hidden_states=True).hidden_states[-2]
        torch.save(hidden.unflatten(0, (b, t))[:, :, 1:].contiguous(), hidden_path)  # [B, T, N, D], CLS dropped


def manifest(config_path: str, out: str) -> None:
    with torch.device("meta"):
        model = build(config_path)
    skip = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if k not in skip}
    Path(out).write_text(json.dumps(shapes, indent=0, sort_keys=True))


if __name__ == "__main__":
    {"features": features, "manifest": manifest}[sys.argv[1]](*sys.argv[2:])
