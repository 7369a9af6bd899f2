import math

import pytest
import torch

from merv.config import FusionConfig, ProjectorConfig
from merv.models.fusion import build_fusion
from merv.models.projector import build_projector


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize(("t_in", "n_in"), [(4, 16), (8, 64), (2, 4)])
def test_avgpool3d_shapes(head, t_in, n_in):
    cfg = ProjectorConfig(temporal_tokens=2, tokens_per_frame=4, head=head)
    proj = build_projector(cfg, in_dim=12, out_dim=20)
    out = proj(torch.randn(3, t_in, n_in, 12))
    assert out.shape == (3, 2 * 4, 20)


def test_avgpool3d_is_the_mean_over_each_cell():
    cfg = ProjectorConfig(temporal_tokens=1, tokens_per_frame=1, head="linear")
    proj = build_projector(cfg, in_dim=3, out_dim=3)
    with torch.no_grad():
        proj.head.weight.copy_(torch.eye(3))
        proj.head.bias.zero_()
    x = torch.randn(2, 4, 16, 3)
    assert torch.allclose(proj(x)[:, 0], x.mean(dim=(1, 2)), atol=1e-6)


def test_avgpool3d_keeps_space_time_order():
    # token i of the output must be (t, row, col) in row-major order, same for every encoder
    cfg = ProjectorConfig(temporal_tokens=2, tokens_per_frame=4, head="linear")
    proj = build_projector(cfg, in_dim=1, out_dim=1)
    with torch.no_grad():
        proj.head.weight.fill_(1.0)
        proj.head.bias.zero_()
    t, side = 2, 2
    x = torch.arange(t * side * side, dtype=torch.float).view(1, t, side * side, 1)
    assert proj(x).flatten().tolist() == list(range(8))


def test_non_square_grid_is_refused():
    proj = build_projector(ProjectorConfig(temporal_tokens=1, tokens_per_frame=1), 4, 4)
    with pytest.raises(ValueError, match="square patch grid"):
        proj(torch.randn(1, 2, 6, 4))


def test_cross_attention_fusion_matches_formula():
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig("cross_attention"), dim=8, num_encoders=3)
    with torch.no_grad():
        fusion.query.normal_()
    tokens = [torch.randn(2, 5, 8) for _ in range(3)]
    fused, w = fusion(tokens)
    assert fused.shape == (2, 5, 8) and w.shape == (2, 3)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    # explicit formula: w_e = softmax_e(q . (W m_e + b) / sqrt(D)), m_e = mean over tokens of encoder e
    for b in range(2):
        scores = torch.stack(
            [fusion.query @ (fusion.key.weight @ x[b].mean(0) + fusion.key.bias) / math.sqrt(8) for x in tokens]
        )
        expected_w = torch.softmax(scores, 0)
        assert torch.allclose(w[b], expected_w, atol=1e-6)
        expected = sum(expected_w[e] * tokens[e][b] for e in range(3))
        assert torch.allclose(fused[b], expected, atol=1e-5)


def test_fusion_weights_depend_on_content():
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(), dim=8, num_encoders=2)
    with torch.no_grad():
        fusion.query.normal_()
    a = [torch.randn(1, 4, 8), torch.randn(1, 4, 8)]
    b = [torch.randn(1, 4, 8), torch.randn(1, 4, 8)]
    assert not torch.allclose(fusion(a)[1], fusion(b)[1])
