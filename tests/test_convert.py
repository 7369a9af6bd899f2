"""merv import-original: the original MERV checkpoint layout converts exactly; pickled code is refused."""

import pathlib

import pytest
import torch

from merv.checkpoint import load_checkpoint
from merv.config import resolve_run_config
from merv.convert import ConversionError, import_original
from tests.conftest import tiny_overrides

H = 24  # the original's fusion query width (3072 in the paper's models)


class Evil:
    """Unpickling this would create a file: the payload a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def run(tiny_run):
    overrides = tiny_overrides(pathlib.Path(tiny_run.model.llm.weights).parent)
    overrides["model"]["fusion"] = {"attn_dim": H}
    return resolve_run_config("merv-tiny", overrides)


def original_checkpoint(model, path):
    """A checkpoint in the original code base's layout, made from ``model``'s weights."""
    torch.manual_seed(3)
    d = model.llm.get_input_embeddings().embedding_dim
    projectors = {}
    for i, name in enumerate(model.encoders):
        for k, v in model.projectors[name].head.state_dict().items():
            projectors[f"{i}.projector.projector.{k}"] = v.clone() + 0.01 * torch.randn_like(v)
    fusion = {
        "Q": torch.randn(1, H),
        "attention.q_proj_weight": torch.randn(H, H) / H**0.5,
        "attention.k_proj_weight": torch.randn(H, d) / d**0.5,
        "attention.v_proj_weight": torch.randn(H, d),
        "attention.in_proj_bias": torch.randn(3 * H) * 0.1,
        "attention.out_proj.weight": torch.randn(H, H),
        "attention.out_proj.bias": torch.zeros(H),
    }
    llm = {f"llm.{k}": v.clone() for k, v in model.llm.state_dict().items()}
    torch.save({"model": {"projectors": projectors, "llm_backbone": llm, "feature_fusion": fusion}}, path)
    return projectors, fusion


def test_import_matches_the_original_modules(run, tmp_path):
    from merv.models.merv import MERV

    source = MERV.from_config(run.model)
    projectors, fusion = original_checkpoint(source, tmp_path / "orig.pt")
    import_original(tmp_path / "orig.pt", run, tmp_path / "imported")
    model, _, meta = load_checkpoint(tmp_path / "imported")
    assert meta["stage"] == "imported" and meta["trained_groups"] == ["fusion", "llm", "projectors"]
    assert torch.equal(model.projectors["vivit"].head.weight, projectors["1.projector.projector.weight"])

    # the fusion weights equal those of the original's nn.MultiheadAttention with one learnable query
    d = model.llm.get_input_embeddings().embedding_dim
    mha = torch.nn.MultiheadAttention(H, 1, batch_first=True, kdim=d, vdim=d)
    mha.load_state_dict({k[len("attention.") :]: v for k, v in fusion.items() if k.startswith("attention.")})
    tokens = [torch.randn(2, run.model.visual_tokens, d) for _ in range(2)]
    summary = torch.stack([t.mean(1) for t in tokens], dim=1)  # [B, E, D]
    _, attn = mha(fusion["Q"].expand(2, 1, H), summary, summary, need_weights=True)
    with torch.no_grad():
        ours = model.fusion.weights(tokens)
    assert torch.allclose(ours, attn[:, 0], atol=1e-5)


def test_malicious_pickle_is_refused(run, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"projectors": Evil(str(marker))}}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="refused to load"):
        import_original(tmp_path / "evil.pt", run, tmp_path / "out")
    assert not marker.exists(), "the pickled payload must never run"
    assert not (tmp_path / "out").exists()


def test_wrong_layout_is_a_clear_error(run, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="expected a dict with a 'model' entry"):
        import_original(tmp_path / "other.pt", run, tmp_path / "out")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        import_original(tmp_path / "text.pt", run, tmp_path / "out")
