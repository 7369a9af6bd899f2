"""The inference API users of the original MERV know: ``load_vid`` then ``generate``."""

from __future__ import annotations

from pathlib import Path

from merv.models.merv import MERV


def load_vid(path_or_name: str | Path, device: str | None = None, dtype: str | None = None) -> MERV:
    """Load a trained model from a merv checkpoint folder (``results/<model>/finetune``), in eval mode, on
    ``device`` in ``dtype`` (default: CUDA in bf16 when present, else CPU fp32; see :mod:`merv.runtime`).

    A preset name (e.g. ``"merv-tiny"``) builds the architecture from the weights its config names, with freshly
    initialised projectors and fusion: useful for smoke tests, not for answers.
    """
    from merv.checkpoint import load_checkpoint
    from merv.config import available_presets, resolve_run_config
    from merv.runtime import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)  # loaded in it: a 7B LLM is never held in fp32 on the way to bf16
    path = Path(path_or_name)
    if (path / "meta.json").is_file():
        model, _, _ = load_checkpoint(path, dtype=dtype)
    elif str(path_or_name) in available_presets():
        model = MERV.from_config(resolve_run_config(str(path_or_name)).model, dtype=dtype)
    else:
        raise FileNotFoundError(
            f"{path_or_name}: not a merv checkpoint folder (no meta.json) nor a preset ({available_presets()})"
        )
    return model.place(device, dtype).eval()
