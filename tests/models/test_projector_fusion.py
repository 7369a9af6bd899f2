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
