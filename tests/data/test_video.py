import numpy as np
import pytest

from merv.data.synth import render, sample_clip, write_mp4
from merv.data.video import VideoError, read_frames, sample_frame_indices


def test_uniform_indices_are_segment_centres():
    assert sample_frame_indices(16, 4) == [2, 6, 10, 14]
    assert sample_frame_indices(16, 16) == list(range(16))
    assert sample_frame_indices(100, 3, start=10, end=40) == [15, 25, 35]


def test_short_video_repeats_frames_in_order():
    idx = sample_frame_indices(3, 8)
    assert len(idx) == 8 and idx == sorted(idx) and set(idx) == {0, 1, 2}


def test_bad_frame_window():
    with pytest.raises(ValueError, match="empty frame window"):
        sample_frame_indices(10, 4, start=10)


@pytest.fixture
def video(tmp_path):
    import random

    frames = render(sample_clip(random.Random(0), "v", 64, 12), 64, 16, 12)
    path = tmp_path / "v.mp4"
    write_mp4(path, frames, fps=8)
    return path, frames


def test_read_frames_union_and_positions(video):
    path, original = video
    frames, positions = read_frames(path, [4, 8], 64)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    for count, pos in positions.items():
        chosen = frames[pos]
        expected = original[sample_frame_indices(16, count)]
        # H.264 at crf 12 + yuv420p: colours survive within a few levels on average
        assert np.abs(chosen.astype(int) - expected.astype(int)).mean() < 6


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not a video at all" * 100), "not a decodable video"),
    ],
)
def test_bad_videos_raise_video_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(VideoError, match=reason) as info:
        read_frames(path, [4], 32)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_video(video, tmp_path):
    path, _ = video
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(VideoError) as info:
        read_frames(cut, [4], 32)
    assert str(cut) in str(info.value)
