"""Pretraining a few steps: the loss falls, the weights are saved through the real paths and load back to the same
features, and the report says what was trained."""

import json
import types

import numpy as np
import pytest
import torch

import merv.pretrain.train
from merv.features.cache import weights_digest
from merv.models.encoders import build_encoder
from merv.models.tiny import init_encoder
from merv.pretrain.config import PretrainConfig
from merv.pretrain.data import pretext_batch
from merv.pretrain.train import CURVE, REPORT, curve_steps, prepare, reload_difference, train_encoder


@pytest.mark.parametrize(("task", "encoder"), [("appearance", "vit"), ("motion", "vivit")])
def test_pretraining_learns_saves_and_reloads(tmp_path, task, encoder):
    cfg = PretrainConfig(
        preset="merv-tiny", encoder=encoder, task=task, steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_samples=8
    )
    trained, report = train_encoder(cfg, tmp_path)
    assert report["loss_last"] < report["loss_first"]
    assert report["reload_max_abs_diff"] == 0.0
    assert json.loads((tmp_path / REPORT).read_text())["held_out_accuracy"] == report["held_out_accuracy"]
    # the curve: held-out accuracy at step 0 and at 20 points up to the last step, drawn in pretext.png
    assert [p["step"] for p in report["curve"]] == [0, *sorted(curve_steps(30, 20))]
    assert report["curve"][0]["accuracy"] == report["held_out_accuracy_before"]
    assert report["curve"][-1] == {"step": 30, "accuracy": report["held_out_accuracy"]}
    assert (tmp_path / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # loaded back by the code path MERV uses (timm's pretrained loader / from_pretrained): the same features
    enc_cfg = cfg.encoder_config(tmp_path)
    reloaded = build_encoder(enc_cfg).eval()
    trained.eval()
    frames = pretext_batch(task, np.random.default_rng(9), 2, 64, trained.num_frames, 2, 4).frames
    with torch.no_grad():
        x = prepare(trained, frames)
        assert torch.equal(trained(x), reloaded(x))
        torch.manual_seed(cfg.seed)
        fresh = init_encoder(enc_cfg)  # the initialisation it started from: training changed the weights
        before = dict(fresh.named_parameters())
        assert any(not torch.equal(p, before[n]) for n, p in reloaded.model.named_parameters())


def test_the_saved_folder_is_a_function_of_the_config(tmp_path, monkeypatch):
    """Every file, the report and its figure included: the folder's digest keys the feature caches made with it, so
    retraining the same weights must leave it as it was."""
    cfg = PretrainConfig(preset="merv-tiny", encoder="vivit", task="motion", steps=4, batch_size=2, eval_samples=2)

    def files() -> dict:
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    train_encoder(cfg, tmp_path)
    first, digest = files(), weights_digest(tmp_path)
    assert {REPORT, CURVE, "model.safetensors"} <= set(first)
    clock = iter(range(0, 10**6, 37))  # a slower run: a wall-time field would differ
    monkeypatch.setattr(merv.pretrain.train, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    train_encoder(cfg, tmp_path)
    second = files()
    assert set(second) == set(first) and [f for f in first if first[f] != second[f]] == []
    assert weights_digest(tmp_path) == digest


def test_a_reload_that_differs_is_an_error(tmp_path):
    cfg = PretrainConfig(preset="merv-tiny", encoder="vit", task="appearance", steps=1, batch_size=2, eval_samples=2)
    trained, _ = train_encoder(cfg, tmp_path)
    with torch.no_grad():
        trained.model.blocks[0].mlp.fc1.weight.add_(1.0)  # no longer what was saved
    frames = pretext_batch("appearance", np.random.default_rng(0), 2, 64, 1, 1, 4).frames
    with pytest.raises(RuntimeError, match=r"encoder 'vit' reloaded from .*model.safetensors differs"):
        reload_difference(trained, cfg.encoder_config(tmp_path), frames)


def test_measuring_the_curve_does_not_change_the_training(tmp_path):
    def weights(points):
        cfg = PretrainConfig(preset="merv-tiny", encoder="vit", task="appearance", steps=6, batch_size=4,
                             eval_samples=4, curve_points=points)  # fmt: skip
        trained, report = train_encoder(cfg, tmp_path / str(points))
        return trained.model.state_dict(), report

    (once, r1), (often, r6) = weights(1), weights(6)
    assert len(r1["curve"]) == 2 and len(r6["curve"]) == 7
    assert all(torch.equal(once[k], often[k]) for k in once)


def test_curve_steps():
    assert curve_steps(30, 20) == {2, 3, 4, 6, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21, 22, 24, 26, 27, 28, 30}
    assert curve_steps(3, 20) == {1, 2, 3} and curve_steps(1500, 5) == {300, 600, 900, 1200, 1500}


def test_loss_weights_scale_each_label_and_zero_leaves_it_out():
    from merv.pretrain.train import pretext_loss

    torch.manual_seed(0)
    logits = {"shape": torch.randn(4, 8), "hue": torch.randn(4, 12), "object_mask": torch.randn(4, 1, 16, 16)}
    labels = {"shape": np.array([0, 1, 2, 3]), "hue": np.array([4, 5, 6, 7]),
              "object_mask": (np.arange(4 * 16 * 16).reshape(4, 1, 16, 16) % 2).astype(np.float32)}  # fmt: skip
    each = {k: pretext_loss({k: v}, labels) for k, v in logits.items()}
    assert torch.allclose(pretext_loss(logits, labels), sum(each.values()))
    weighted = pretext_loss(logits, labels, {"hue": 0, "object_mask": 0.5})
    assert torch.allclose(weighted, each["shape"] + 0.5 * each["object_mask"])
    with pytest.raises(ValueError, match=r"loss_weights names \['direction'\], not labels of task 'appearance'"):
        PretrainConfig(preset="merv-tiny", encoder="vit", task="appearance", loss_weights={"direction": 1.0})
