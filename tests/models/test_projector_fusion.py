import pytest
import torch

from merv.config import FusionConfig, ProjectorConfig
from merv.models.fusion import build_fusion
from merv.models.projector import build_projector


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


def test_fusion_weights_depend_on_content():
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(), dim=8, num_encoders=2)
    with torch.no_grad():
        fusion.query.normal_()
    a = [torch.randn(1, 4, 8), torch.randn(1, 4, 8)]
    b = [torch.randn(1, 4, 8), torch.randn(1, 4, 8)]
    assert not torch.allclose(fusion(a)[1], fusion(b)[1])


def test_cross_attention_is_parameterised_as_the_originals():
    """Q [1, A], W_q [A, A] + b_q, W_k [A, D] + b_k as the original's one-head nn.MultiheadAttention, xavier-uniform
    weights and zero biases as its _reset_parameters: the same weights give the same mixing weights as torch's
    attention."""
    torch.manual_seed(0)
    a, d = 6, 8
    fusion = build_fusion(FusionConfig(attn_dim=a), dim=d, num_encoders=3)
    assert fusion.query.shape == (1, a) and fusion.q_proj.weight.shape == (a, a) and fusion.key.weight.shape == (a, d)
    assert not fusion.q_proj.bias.any() and not fusion.key.bias.any()
    for w in (fusion.query, fusion.q_proj.weight, fusion.key.weight):  # xavier_uniform: |w| <= sqrt(6 / fan sum)
        assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.std() > 0.2 * (6 / sum(w.shape)) ** 0.5
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()
    mha = torch.nn.MultiheadAttention(a, 1, batch_first=True, kdim=d, vdim=d)
    with torch.no_grad():
        mha.q_proj_weight.copy_(fusion.q_proj.weight)
        mha.k_proj_weight.copy_(fusion.key.weight)
        mha.in_proj_bias[:a].copy_(fusion.q_proj.bias)
        mha.in_proj_bias[a : 2 * a].copy_(fusion.key.bias)
    tokens = [torch.randn(2, 5, d) for _ in range(3)]
    summary = torch.stack([t.mean(1) for t in tokens], 1)
    _, attn = mha(fusion.query.expand(2, 1, a), summary, summary)
    assert torch.allclose(fusion(tokens)[1], attn[:, 0], atol=1e-6)
