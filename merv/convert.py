"""Import a checkpoint of the original MERV code base (``princetonvisualai/merv``) into a merv checkpoint folder.

The original saves ``torch.save({"model": {"projectors", "llm_backbone", "feature_fusion"}, ...})`` (later code adds
``optimizer``, ``lr_scheduler`` and ``step`` at the top level, which are not imported). Its layout, derived from its
code and written down with the source commit in ``tests/data/original_layout.json``:

- ``projectors``: a ``ModuleList`` in encoder order, ``{i}.projector.projector.*`` for the linear (``weight``,
  ``bias``) or GELU-MLP (``0.*``, ``2.*``) head of the 3-D average-pooling projector. Older checkpoints hold one
  ``projector`` group instead, which the original's loader reads as projector 0.
- ``llm_backbone``: the LLM wrapped as ``llm.*``; Llama tokenizers get a ``<PAD>`` token and the embedding rows and
  LM head are padded to a multiple of 64 (32064 rows), which the config must say (``llm.add_special_tokens``,
  ``llm.pad_vocab_to_multiple_of``) so the model is rebuilt that way.
- ``feature_fusion`` (or its older name ``adapter``): the cross-attention fusion, an ``nn.MultiheadAttention`` of one
  head with a learnable query ``Q``. merv holds ``Q``, ``W_q``, ``b_q``, ``W_k`` and ``b_k`` as they are; the value
  and output projections, which the original saves but never uses, are checked and dropped. Single-encoder models
  keep this fusion over their one encoder.

Importing is strict: every tensor the configured model expects must come from the file with its shape, or a
:class:`ConversionError` names the tensor. The file is read with ``weights_only=True`` (a pickle that carries code is
refused, never executed) and memory-mapped, its digest is computed in chunks, and the weights are written as they
are (in the config's ``dtype``); the configured LLM is only built on the meta device to check shapes against, so
memory stays near one copy of the weights.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import torch

from merv.checkpoint import check_state, save_checkpoint
from merv.config import ModelConfig, RunConfig
from merv.integrity import IntegrityError
from merv.models.merv import MERV, add_tokens
from merv.runtime import DTYPES
from merv.weights import project_record

log = logging.getLogger(__name__)

# AveragePooling3DProjector.projector (a LinearProjector or MLPProjector) .projector (its Linear or Sequential)
PROJECTOR_PREFIX = "projector.projector."
MHA_KEYS = (  # nn.MultiheadAttention(embed_dim=A, num_heads=1, kdim=D, vdim=D): q/k/v weights kept apart
    "attention.q_proj_weight",
    "attention.k_proj_weight",
    "attention.v_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
)


class ConversionError(ValueError):
    """An original checkpoint that cannot be imported: unsafe, or not of a supported layout."""


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file read in chunks (a 27 GB checkpoint is never held in memory to hash it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _load(path: Path) -> object:
    """``torch.load`` of tensors and plain containers only, memory-mapped when the file is a zip archive (what
    ``torch.save`` writes since PyTorch 1.6), so that tensors are read from the file as they are used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format


def load_original_state(path: str | Path) -> dict:
    """The ``model`` dict of an original checkpoint, loaded without running any pickled code, with the legacy
    ``projector`` group read as ``projectors`` (projector 0) and ``adapter`` as ``feature_fusion``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        blob = _load(path)
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
    model = dict(blob["model"])
    for legacy, name, prefix in (("projector", "projectors", "0."), ("adapter", "feature_fusion", "")):
        if legacy in model:
            if model.get(name):
                raise ConversionError(f"{path}: the 'model' dict holds both {legacy!r} and {name!r}; keep one")
            model[name] = {prefix + k: v for k, v in model.pop(legacy).items()}
    missing = [k for k in ("projectors", "llm_backbone") if k not in model]
    if missing:
        raise ConversionError(f"{path}: the 'model' dict lacks {missing}; it has {sorted(model)}")
    unknown = sorted(set(model) - {"projectors", "llm_backbone", "feature_fusion", "video_backbone"})
    if unknown:
        raise ConversionError(f"{path}: the 'model' dict has groups the original never saves: {unknown}")
    return model


def _projectors(original: dict, run: RunConfig) -> dict[str, torch.Tensor]:
    ids = [e.id for e in run.model.encoders]
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in original["projectors"].items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest.startswith(PROJECTOR_PREFIX):
            raise ConversionError(f"unexpected projector key {key!r} (expected '<i>.{PROJECTOR_PREFIX}*')")
        by_index.setdefault(int(index), {})[rest[len(PROJECTOR_PREFIX) :]] = value
    if sorted(by_index) != list(range(len(ids))):
        raise ConversionError(
            f"the checkpoint has projectors {sorted(by_index)} but the config has {len(ids)} encoders {ids} "
            "(one projector per encoder, in the config's order)"
        )
    return {f"projectors.{ids[i]}.head.{k}": v for i, head in by_index.items() for k, v in head.items()}


def _fusion(original: dict, run: RunConfig) -> dict[str, torch.Tensor]:
    fusion = original.get("feature_fusion") or {}
    kind, attn_dim = run.model.fusion.kind, run.model.fusion.attn_dim
    if kind == "cross_attention":
        if not fusion:
            raise ConversionError(
                "the checkpoint's fusion group (feature_fusion/adapter) is empty, but the config's fusion is "
                "cross_attention: its weights would stay random (a checkpoint of a concatenating fusion needs that "
                "fusion kind in the config)"
            )
        expected = {"Q", *MHA_KEYS}
        if set(fusion) != expected:
            raise ConversionError(
                "the checkpoint's fusion is not the original's cross-attention with a learnable query: missing "
                f"{sorted(expected - set(fusion))}, unexpected {sorted(set(fusion) - expected)}"
            )
        a = fusion["Q"].shape[-1]
        if (attn_dim or a) != a or fusion["attention.in_proj_bias"].shape != (3 * a,):
            raise ConversionError(
                f"the checkpoint's fusion query is {a} wide: set model.fusion.attn_dim: {a} to import it"
            )
        bias = fusion["attention.in_proj_bias"]
        return {
            "fusion.query": fusion["Q"],
            "fusion.q_proj.weight": fusion["attention.q_proj_weight"],
            "fusion.q_proj.bias": bias[:a].clone(),  # slices of one tensor: stored apart
            "fusion.key.weight": fusion["attention.k_proj_weight"],
            "fusion.key.bias": bias[a : 2 * a].clone(),
        }
    if kind == "channel_concat":  # the original's concat_channel: a LinearProjector over the concatenated channels
        if set(fusion) != {"projector.weight", "projector.bias"}:
            raise ConversionError(f"expected a channel-concat fusion (projector.weight/bias), got {sorted(fusion)}")
        return {"fusion.proj.weight": fusion["projector.weight"], "fusion.proj.bias": fusion["projector.bias"]}
    if kind == "learnable_scalar":  # the original's ScalarAdapter
        if set(fusion) != {"scalar"}:
            raise ConversionError(f"expected a learnable-scalar fusion ('scalar'), got {sorted(fusion)}")
        return {"fusion.logits": fusion["scalar"]}
    if fusion:
        hint = " (set model.fusion: {kind: cross_attention, attn_dim: <its width>})" if "Q" in fusion else ""
        raise ConversionError(
            f"the config's fusion {kind!r} has no weights, but the checkpoint has {sorted(fusion)}{hint}"
        )
    return {}


def convert_state(original: dict, run: RunConfig) -> dict[str, torch.Tensor]:
    """Map the original's keys onto this package's module names (see the module docstring)."""
    if run.model.projector.pooling != "avgpool3d":
        raise ConversionError("importing supports the original's 3-D average-pooling projector ('3davg') only")
    state = _projectors(original, run)
    for key, value in original["llm_backbone"].items():
        if not key.startswith("llm."):
            raise ConversionError(f"unexpected LLM key {key!r} (expected 'llm.*')")
        state[key] = value
    state.update(_fusion(original, run))
    return state


def _vocab_hint(state: dict, expected: dict) -> str:
    key = "llm.model.embed_tokens.weight"
    if key in state and key in expected and state[key].shape[0] != expected[key][0][0]:
        return (
            f" The checkpoint's LLM has {state[key].shape[0]} embedding rows, the configured one "
            f"{expected[key][0][0]}: the original adds a <PAD> token and pads the rows to a multiple of 64 "
            "(set llm.add_special_tokens: {pad_token: <PAD>} and llm.pad_vocab_to_multiple_of: 64)."
        )
    return ""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the state of the model ``cfg`` describes, as :meth:`MERV.from_config` builds it, with
    the LLM built on the meta device from its ``config.json`` (its weights, which an import replaces, are never
    read; the encoders, which it keeps, are built as they are)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merv.models.encoders import build_encoder
    from merv.weights import resolve_model

    cfg = resolve_model(cfg, ())
    llm_path = Path(cfg.llm.weights)
    if not (llm_path / "config.json").is_file():
        raise FileNotFoundError(f"LLM weights: no transformers checkpoint (config.json) in {llm_path}")
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_path))
        add_tokens(llm, tokenizer, cfg.llm.add_special_tokens, cfg.llm.pad_vocab_to_multiple_of)
    model = MERV(cfg, llm, tokenizer, {e.id: build_encoder(e) for e in cfg.encoders})
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def import_original(path: str | Path, run: RunConfig, out: str | Path) -> Path:
    """Convert ``path`` for the model ``run`` describes and write a merv checkpoint folder at ``out``."""
    path, out = Path(path), Path(out)
    original = load_original_state(path)
    state = convert_state(original, run)
    expected = expected_shapes(run.model)
    groups = sorted({k.split(".")[0] for k in state})
    try:
        check_state(state, expected, groups, str(path))
    except IntegrityError as e:
        raise ConversionError(f"{e}.{_vocab_hint(state, expected)}") from None
    dtype = DTYPES[run.model.dtype]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    digest = file_sha256(path)
    meta = {
        "stage": "imported",
        "step": 0,
        "trained_groups": groups,
        "init": None,
        "source": {"path": str(path), "sha256": digest},
        "config_fingerprint": f"import-{digest[:12]}",
        "project": project_record(out),
    }
    save_checkpoint(None, run, out, meta, full_state=state)
    log.info("imported %d tensors (%s) from %s", len(state), ", ".join(groups), path)
    return out
