"""Import a checkpoint of the original MERV code base into a merv checkpoint folder.

The original saves ``torch.save({"model": {"projectors": ..., "llm_backbone": ..., "feature_fusion": ...}})``:
projectors as a ``ModuleList`` in encoder order (``{i}.projector.projector.*`` for the linear / GELU-MLP head of the
3-D average-pooling projector), the LLM wrapped as ``llm.*``, and the cross-attention fusion as an
``nn.MultiheadAttention`` with a learnable query ``Q`` (one head). The file is read with ``weights_only=True``: a
pickle that carries code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from merv.checkpoint import save_checkpoint
from merv.config import RunConfig
from merv.models.merv import MERV
from merv.weights import project_record


class ConversionError(ValueError):
    """An original checkpoint that cannot be imported: unsafe, or not of a supported layout."""


def load_original_state(path: str | Path) -> dict:
    """The ``model`` dict of an original checkpoint, loaded without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: refused to load: the pickle holds more than tensors and plain containers "
            f"(possibly code; loaded with weights_only=True): {first}"
        ) from None
    except Exception as e:
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise ConversionError(f"{path}: expected a dict with a 'model' entry (the original MERV layout)")
    model = blob["model"]
    missing = [k for k in ("projectors", "llm_backbone") if k not in model]
    if missing:
        raise ConversionError(f"{path}: the 'model' dict lacks {missing}; it has {sorted(model)}")
    return model


def convert_state(original: dict, run: RunConfig) -> dict[str, torch.Tensor]:
    """Map the original's keys onto this package's module names (see the module docstring)."""
    if run.model.projector.pooling != "avgpool3d":
        raise ConversionError("importing supports the original's 3-D average-pooling projector ('3davg') only")
    ids = [e.id for e in run.model.encoders]
    state: dict[str, torch.Tensor] = {}
    for key, value in original["projectors"].items():
        index, rest = key.split(".", 1)
        if not rest.startswith("projector.projector."):
            raise ConversionError(f"unexpected projector key {key!r} (expected '<i>.projector.projector.*')")
        if int(index) >= len(ids):
            raise ConversionError(f"checkpoint has projector {index} but the config has {len(ids)} encoders")
        state[f"projectors.{ids[int(index)]}.head.{rest[len('projector.projector.') :]}"] = value
    for key, value in original["llm_backbone"].items():
        if not key.startswith("llm."):
            raise ConversionError(f"unexpected LLM key {key!r} (expected 'llm.*')")
        state[key] = value
    fusion = original.get("feature_fusion") or original.get("adapter") or {}
    kind = run.model.fusion.kind
    if kind == "cross_attention":
        h = fusion["Q"].shape[-1]
        q = fusion["attention.q_proj_weight"] @ fusion["Q"][0] + fusion["attention.in_proj_bias"][:h]
        state["fusion.query"] = q
        state["fusion.key.weight"] = fusion["attention.k_proj_weight"]
        state["fusion.key.bias"] = fusion["attention.in_proj_bias"][h : 2 * h]
        if run.model.fusion.attn_dim != h:
            raise ConversionError(f"set model.fusion.attn_dim: {h} to import this cross-attention fusion")
    elif kind == "channel_concat":
        state["fusion.proj.weight"] = fusion["projector.weight"]
        state["fusion.proj.bias"] = fusion["projector.bias"]
    elif fusion:
        raise ConversionError(f"importing a {kind!r} fusion is not supported; the checkpoint has {sorted(fusion)}")
    return state


def import_original(path: str | Path, run: RunConfig, out: str | Path) -> Path:
    """Convert ``path`` for the model ``run`` describes and write a merv checkpoint folder at ``out``."""
    original = load_original_state(path)
    model = MERV.from_config(run.model)
    state = convert_state(original, run)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"{path}: weights do not fit the configured model, e.g. {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    groups = sorted({k.split(".")[0] for k in state})
    meta = {
        "stage": "imported",
        "step": 0,
        "trained_groups": groups,
        "init": None,
        "source": {"path": str(path), "sha256": digest},
        "config_fingerprint": f"import-{digest[:12]}",
        "project": project_record(Path(out)),
    }
    save_checkpoint(model, run, Path(out), meta)
    return Path(out)
