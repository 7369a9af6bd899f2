import numpy as np
import pytest

from merv.data.video import (
    BACKENDS,
    VideoError,
    _decoded_rotation,
    _display_rotation,
    _mp4_rotation,
    clip_window,
    open_media,
    read_frames,
    resize_frames,
    sample_frame_indices,
    short_side_size,
)
from tests.media import gradient_frames, make_bad_inputs, write_video


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


def test_clip_window_uses_timestamps():
    ts = np.array([0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 2.0])  # variable frame rate
    assert clip_window(ts, time=(1.0, 1.2)) == (4, 7)
    assert clip_window(ts, end_frame=3) == (0, 3)
    assert clip_window(ts, time=(0.5, 0.6)) == (4, 5), "an empty window keeps the nearest frame"
    assert clip_window(ts, time=(9.0, 10.0)) == (7, 8), "a window past the end keeps the last frame"
    with pytest.raises(ValueError, match="ends before it starts"):
        clip_window(ts, time=(2.0, 1.0))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "plain": write_video(d / "plain.mp4", gradient_frames(20, 48, 64)),
        "rotated": write_video(d / "rotated.mp4", gradient_frames(10, 48, 64), rotation=90),
        "vfr": write_video(d / "vfr.mp4", gradient_frames(8, 32, 32), times=[0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 2.0]),
        "gray": write_video(d / "gray.mp4", gradient_frames(6, 30, 42), pix_fmt="gray"),
        "odd": write_video(d / "odd.mp4", gradient_frames(6, 45, 67), pix_fmt="yuv444p"),
        "long": write_video(d / "long.mp4", gradient_frames(900, 32, 32), fps=30, pix_fmt="yuv444p"),
        "short": write_video(d / "short.mp4", gradient_frames(3, 32, 32), pix_fmt="yuv444p"),
        "wide": write_video(d / "wide.mp4", gradient_frames(6, 360, 640)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_plain_video(media, backend):
    frames, positions = read_frames(media["plain"], [4, 8], 64, backend=backend)
    reference, _ = read_frames(media["plain"], [4, 8], 64, backend="pyav")
    assert frames.shape == (12, 64, 85, 3) and sorted(positions) == [4, 8]  # 48 x 64 -> short side 64
    assert np.abs(frames.astype(int) - reference).mean() < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_is_applied(media, backend):
    with open_media(media["rotated"], backend) as m:
        frame = m.frames([0])[0]
    assert frame.shape == (64, 48, 3), "a 90-degree display rotation swaps width and height"
    # the red mark drawn top-left ends bottom-left after a counter-clockwise quarter turn
    assert frame[-4:, :4, 0].mean() > 200 and frame[-4:, :4, 1].mean() < 60


@pytest.mark.parametrize("container", ["mp4", "mov", "faststart.mp4", "mkv"])
def test_rotation_without_decoding_agrees_with_ffmpeg(tmp_path, container):
    """MP4/MOV rotation comes from the header boxes (no decoding, no second open); it must equal what FFmpeg
    reports on a decoded frame. Other containers (Matroska) still ask FFmpeg."""
    for degrees in (0, 90, 180, 270):
        path = write_video(tmp_path / f"r{degrees}.{container}", gradient_frames(2, 16, 32), rotation=degrees)
        assert _display_rotation(path) == _decoded_rotation(path), (container, degrees)
        assert (_mp4_rotation(path) is None) == (container == "mkv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotated_matroska_is_rotated(tmp_path, backend):
    path = write_video(tmp_path / "rotated.mkv", gradient_frames(4, 48, 64), rotation=90)
    frames, _ = read_frames(path, [2], 48, backend=backend)
    assert frames.shape == (2, 64, 48, 3) and frames[0, -4:, :4, 0].mean() > 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_timestamps(media, backend):
    with open_media(media["vfr"], backend) as m:
        assert np.allclose(m.timestamps, [0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 2.0], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_and_odd_sizes_give_rgb(media, backend):
    frames, _ = read_frames(media["gray"], [3], 32, backend=backend)
    assert frames.shape == (3, 32, 45, 3)  # 30 x 42 -> 32 x 44.8
    assert np.abs(frames[..., 0].astype(int) - frames[..., 2]).max() <= 2, "gray stays gray"
    with open_media(media["odd"], backend) as m:
        assert m.frames([0, 5]).shape == (2, 45, 67, 3)


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [(360, 640, 224, (224, 398)), (640, 360, 224, (398, 224)), (50, 50, 32, (32, 32)), (45, 67, 32, (32, 48))],
)
def test_short_side_size(height, width, size, expected):
    assert short_side_size(height, width, size) == expected


def test_resize_keeps_squares_and_content():
    frames = gradient_frames(2, 48, 48)
    assert resize_frames(frames, 48) is frames
    small = resize_frames(frames, 24)
    assert small.shape == (2, 24, 24, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - frames[:, ::2, ::2]).mean() < 20  # blur at edges only


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_square_video_keeps_its_aspect_ratio(media, backend):
    frames, _ = read_frames(media["wide"], [4], 224, backend=backend)
    assert frames.shape == (4, 224, 398, 3), "640 x 360 -> short side 224, long side 640 * 224 / 360 = 398.2"
    # the red mark covers the top-left quarter (160 x 90 source pixels): still 16:9 after resizing, not squashed
    red = (frames[0, ..., 0] > 180) & (frames[0, ..., 1] < 90)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert abs(len(rows) - 56) <= 2 and abs(len(cols) - 100) <= 2, (len(rows), len(cols))


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_video_samples_the_right_frames(media, backend):
    frames, positions = read_frames(media["long"], [4], 32, backend=backend)
    expected = gradient_frames(900, 32, 32)[sample_frame_indices(900, 4)]
    assert np.abs(frames[positions[4]].astype(int) - expected).mean() < 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_frames_than_requested(media, backend):
    frames, positions = read_frames(media["short"], [8], 32, backend=backend)
    assert len(positions[8]) == 8 and frames.shape[0] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_video_error_naming_the_file(media, tmp_path, backend):
    for kind, path in make_bad_inputs(tmp_path / backend, media["plain"]).items():
        with pytest.raises(VideoError) as info:
            read_frames(path, [4], 32, backend=backend)
        assert str(path) in str(info.value) and "\n" not in str(info.value), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_decoding_resizes_to_the_same_bytes(media, backend, monkeypatch):
    """Frames decoded and resized a chunk at a time (each chunk straight from decord's buffer) are byte for byte
    those of resizing the whole decoded stack."""
    for name, size, count in (("wide", 224, 5), ("plain", 32, 8), ("plain", 80, 7)):  # down- and upscaled
        with open_media(media[name], backend) as m:
            frame_bytes = m.frames([0]).nbytes
        monkeypatch.setattr("merv.data.video.CHUNK_BYTES", 2 * frame_bytes)  # chunks of 1, 2, 2, ... frames
        with open_media(media[name], backend) as m:
            union = sample_frame_indices(m.num_frames, count)
            whole = resize_frames(m.frames(union), size)
        frames, positions = read_frames(media[name], [count], size, backend=backend)
        assert frames.dtype == np.uint8 and np.array_equal(frames[positions[count]], whole), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_in_decoder_gives_the_stored_size_and_other_pixels(media, backend):
    for name, size in (("wide", 224), ("rotated", 32), ("odd", 32), ("plain", 64)):
        exact, _ = read_frames(media[name], [4], size, backend=backend)
        scaled, _ = read_frames(media[name], [4], size, backend=backend, scale_in_decoder=True)
        assert scaled.shape == exact.shape, name  # rotation applied after scaling: the same turned size
        diff = np.abs(scaled.astype(int) - exact)
        assert diff.mean() < 3 and diff.max() > 0, (name, diff.mean())  # the same picture through another scaler


@pytest.mark.parametrize(
    ("container", "height", "width", "pix_fmt"),
    [("mp4", 360, 640, "yuv420p"), ("mov", 45, 67, "yuv444p"), ("mp4", 30, 42, "gray")],
)
def test_mp4_header_gives_the_decoded_frame_size(tmp_path, container, height, width, pix_fmt):
    """The frame size read from the header (what decord scales from) is the size FFmpeg decodes, or None."""
    from merv.data.video import _coded_size, _mp4_video_track

    for degrees in (0, 90):
        path = tmp_path / f"v{degrees}.{container}"
        write_video(path, gradient_frames(2, height, width), rotation=degrees, pix_fmt=pix_fmt)
        assert _mp4_video_track(path) == (degrees, (height, width)) and _coded_size(path) == (height, width)
