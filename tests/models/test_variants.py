"""Every projector x fusion kind inside the real model (tiny weights): shapes, gradients, fusion formulas."""

import itertools
import math

import pytest
import torch

from merv.config import FusionConfig, ProjectorConfig, deep_merge, preset_dict, run_config_from_dict
from merv.models.fusion import FUSIONS, build_fusion
from merv.models.merv import MERV
from merv.models.projector import PROJECTORS, build_projector
from merv.train.loop import set_trainable
from tests.conftest import tiny_overrides

POOLINGS = sorted(PROJECTORS)
MULTI_FUSIONS = sorted(set(FUSIONS) - {"single"})


@pytest.mark.parametrize(("pooling", "head"), list(itertools.product(POOLINGS, ["linear", "mlp"])))
@pytest.mark.parametrize(("t_in", "n_in"), [(4, 16), (8, 64), (2, 4)])
def test_projector_shapes(pooling, head, t_in, n_in):
    cfg = ProjectorConfig(pooling=pooling, temporal_tokens=2, tokens_per_frame=4, head=head)
    proj = build_projector(cfg, in_dim=12, out_dim=20)
    assert proj(torch.randn(3, t_in, n_in, 12)).shape == (3, 2 * 4, 20)


def test_avgpool2d_subsamples_time_without_mixing():
    cfg = ProjectorConfig(pooling="avgpool2d", temporal_tokens=2, tokens_per_frame=1)
    proj = build_projector(cfg, 1, 1)
    with torch.no_grad():
        proj.head.weight.fill_(1.0)
        proj.head.bias.zero_()
    x = torch.arange(4, dtype=torch.float).view(1, 4, 1, 1).expand(1, 4, 4, 1)  # frame t has value t everywhere
    assert proj(x).flatten().tolist() == [1.0, 3.0]  # frames at segment centres 1 and 3, not averages


def _tokens(e=3, b=2, length=5, d=8):
    torch.manual_seed(0)
    return [torch.randn(b, length, d) for _ in range(e)]


def test_learnable_scalar_formula():
    fusion = build_fusion(FusionConfig("learnable_scalar"), 8, 3)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tokens = _tokens()
    fused, w = fusion(tokens)
    e = torch.exp(torch.tensor([0.5, -1.0, 2.0]))
    expected_w = e / e.sum()
    assert torch.allclose(w, expected_w.expand(2, 3)) and torch.allclose(w.sum(-1), torch.ones(2))
    assert torch.allclose(fused, sum(expected_w[i] * tokens[i] for i in range(3)), atol=1e-6)


def test_channel_concat_formula():
    fusion = build_fusion(FusionConfig("channel_concat"), 8, 3)
    tokens = _tokens()
    fused, w = fusion(tokens)
    W, b = fusion.proj.weight, fusion.proj.bias  # [8, 24], [8]
    expected = sum(tokens[i] @ W[:, 8 * i : 8 * (i + 1)].T for i in range(3)) + b
    assert w is None and torch.allclose(fused, expected, atol=1e-5)


def test_sequence_concat_and_single():
    tokens = _tokens()
    fused, w = build_fusion(FusionConfig("sequence_concat"), 8, 3)(tokens)
    assert w is None and fused.shape == (2, 15, 8) and torch.equal(fused[:, 5:10], tokens[1])
    fused, w = build_fusion(FusionConfig("single"), 8, 1)(tokens[:1])
    assert torch.equal(fused, tokens[0]) and torch.equal(w, torch.ones(2, 1))
    with pytest.raises(ValueError, match="exactly one encoder"):
        build_fusion(FusionConfig("single"), 8, 2)


def test_cross_attention_formula():
    fusion = build_fusion(FusionConfig("cross_attention"), 8, 3)
    tokens = _tokens()
    fused, w = fusion(tokens)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    q = fusion.q_proj.weight @ fusion.query[0] + fusion.q_proj.bias  # the original's W_q Q + b_q
    for b in range(2):
        scores = torch.stack([q @ (fusion.key.weight @ x[b].mean(0) + fusion.key.bias) / math.sqrt(8) for x in tokens])
        expected_w = torch.softmax(scores, 0)
        assert torch.allclose(w[b], expected_w, atol=1e-6)
        assert torch.allclose(fused[b], sum(expected_w[e] * tokens[e][b] for e in range(3)), atol=1e-5)


@pytest.fixture(scope="module")
def weights_dir(tiny_run):
    from pathlib import Path

    return Path(tiny_run.model.llm.weights).parent


@pytest.mark.parametrize(("pooling", "fusion"), list(itertools.product(POOLINGS, MULTI_FUSIONS + ["single"])))
def test_every_projector_and_fusion_in_the_model(weights_dir, shards, pooling, fusion):
    from merv.data.batching import collate, training_example
    from merv.data.shards import iter_samples

    overrides = tiny_overrides(weights_dir)
    overrides["model"]["projector"] = {"pooling": pooling}
    overrides["model"]["fusion"] = {"kind": fusion}
    data = deep_merge(preset_dict("merv-tiny"), overrides)
    if fusion == "single":
        data["model"]["encoders"] = data["model"]["encoders"][:1]
    run = run_config_from_dict(data)
    torch.manual_seed(0)
    model = MERV.from_config(run.model)
    examples = [training_example(model, s) for s, _ in zip(iter_samples(shards["finetune"]), range(2), strict=False)]
    batch = collate(examples)
    visual, weights = model.encode(batch["videos"])
    assert visual.shape == (2, run.model.visual_tokens, 128)  # sequence_concat doubles the tokens
    if weights is not None:
        assert torch.allclose(weights.sum(-1), torch.ones(2))

    set_trainable(model, ("projectors", "fusion"))
    loss, n, _ = model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])
    (loss / n).backward()
    for name, p in model.named_parameters():
        trainable = name.split(".")[0] in ("projectors", "fusion")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in model.projectors.parameters())
