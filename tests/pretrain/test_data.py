"""Pretext data: shapes and labels agree with what is drawn, paths stay on screen, the same seed gives the same data."""

import numpy as np
import pytest

from merv.pretrain.data import (
    DIRECTIONS,
    HUE_BINS,
    SHAPES,
    appearance_batch,
    label_classes,
    motion_batch,
    motion_path,
    patch_coverage,
    pretext_batch,
    token_labels,
)


def test_appearance_labels_match_the_drawn_object():
    batch = appearance_batch(np.random.default_rng(0), 16, 64, grid=4)
    assert batch.frames.shape == (16, 1, 64, 64, 3) and batch.frames.dtype == np.uint8
    assert batch.labels["shape"].max() < len(SHAPES) and batch.labels["hue"].max() < HUE_BINS
    assert batch.labels["shape_map"].shape == (16, 1, 16)
    for i in range(16):
        on = batch.labels["shape_map"][i, 0] > 0
        assert set(batch.labels["shape_map"][i, 0][on]) <= {batch.labels["shape"][i] + 1}
        assert set(batch.labels["hue_map"][i, 0][on]) <= {batch.labels["hue"][i] + 1}


def test_hue_bins_are_centred_on_red():
    """A red object (hue 0) is bin 0, not split between the first and last bin."""
    batch = appearance_batch(np.random.default_rng(3), 200, 32, grid=4)
    for frame, hue in zip(batch.frames[:, 0], batch.labels["hue"], strict=True):
        pixels = frame.reshape(-1, 3).astype(int)
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        r, g, b = values[counts.argmax()]  # the solid object is usually the most frequent colour
        if r > 150 and g < 60 and b < 60:
            assert hue in (0, 11, 1)


@pytest.mark.parametrize("tubelet", [2, 4])
def test_motion_path_turns_only_between_tubelets_and_stays_on_screen(tubelet):
    rng = np.random.default_rng(1)
    for _ in range(50):
        centres, classes = motion_path(rng, 8, 64, r=6.0, tubelet=tubelet)
        assert centres.shape == (8, 2) and classes.shape == (7,)
        assert (centres >= 7).all() and (centres <= 64 - 7).all()
        steps = np.diff(centres, axis=0)
        for step, cls in zip(steps, classes, strict=True):
            if DIRECTIONS[cls] == "still":
                assert np.allclose(step, 0)
            else:  # the step points the way its class says
                expected = {"E": (1, 0), "N": (0, -1), "W": (-1, 0), "S": (0, 1)}
                name = DIRECTIONS[cls]
                sx = sum(expected[c][0] for c in name)
                sy = sum(expected[c][1] for c in name)
                assert np.sign(step[0]) == np.sign(sx) and np.sign(step[1]) == np.sign(sy)
        for t in range(0, 7, tubelet):  # one direction within a tubelet
            assert len(set(classes[t : t + tubelet])) == 1


def test_motion_labels_per_temporal_position():
    batch = motion_batch(np.random.default_rng(2), 6, 64, num_frames=8, tubelet=2, grid=4)
    assert batch.frames.shape == (6, 8, 64, 64, 3)
    assert batch.labels["direction"].shape == (6, 4) and batch.labels["direction"].max() < len(DIRECTIONS)
    maps = batch.labels["direction_map"]
    assert maps.shape == (6, 4, 16)
    on = maps > 0
    assert (maps[on] - 1 == np.broadcast_to(batch.labels["direction"][..., None], maps.shape)[on]).all()


def test_same_seed_same_data_and_bad_sizes_fail():
    a = pretext_batch("motion", np.random.default_rng(5), 2, 32, 4, 2, 4)
    b = pretext_batch("motion", np.random.default_rng(5), 2, 32, 4, 2, 4)
    assert (a.frames == b.frames).all()
    with pytest.raises(ValueError, match="must be a multiple of 4 x the patch grid 3"):
        pretext_batch("appearance", np.random.default_rng(0), 1, 32, 1, 1, 3)
    with pytest.raises(ValueError, match="unknown pretext task 'colour'"):
        pretext_batch("colour", np.random.default_rng(0), 1, 32, 1, 1, 4)


def test_coverage_and_token_labels():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, :4, :2] = True  # half of the top-left 4x4 patch
    coverage = patch_coverage(masks, 2)
    assert coverage.tolist() == [[0.5, 0.0, 0.0, 0.0]]
    assert token_labels(np.array([3]), coverage).tolist() == [[4, 0, 0, 0]]
    assert label_classes("motion") == {"direction": 9, "direction_map": 10}
