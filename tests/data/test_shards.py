import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import merv.data.shards as shards_module
from merv.data.shards import (
    DataFormatError,
    Item,
    ShardSettings,
    collect_items,
    iter_samples,
    read_manifest,
    write_shards,
)
from merv.data.video import VideoError, read_frames
from tests.helpers import alive, descendants
from tests.media import gradient_frames, make_bad_inputs, write_video

NPY = dict(frame_counts=(4, 8), size=64, frame_format="npy")


def test_training_shards_roundtrip(shards):
    manifest = read_manifest(shards["finetune"])
    assert manifest["samples"] == manifest["input"] == 12 and manifest["bad"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4]  # 4 x 147 kB frames reach the 500 kB target
    samples = list(iter_samples(shards["finetune"]))
    assert len(samples) == 12 and len({s["meta"]["key"] for s in samples}) == 12
    first = samples[0]
    direct, positions = read_frames(first["meta"]["source"], [4, 8], 64)
    assert np.array_equal(first["frames"], direct), "npy shards hold exactly the decoded frames"
    assert first["meta"]["frame_positions"] == {str(c): p for c, p in positions.items()}
    assert first["meta"]["conversations"][0]["from"] == "human"


def test_jpeg_frames_are_close_to_the_decoded_ones(synth_dir, tmp_path):
    items = collect_items(synth_dir / "train" / "align.json")[:2]
    write_shards(items, tmp_path / "jpg", ShardSettings(frame_counts=(4, 8), size=64))
    for sample in iter_samples(tmp_path / "jpg"):
        direct, _ = read_frames(sample["meta"]["source"], [4, 8], 64)
        assert sample["frames"].shape == direct.shape
        assert np.abs(sample["frames"].astype(int) - direct).mean() < 3


def test_benchmark_shards_join_questions_and_answers(shards):
    records = [s["meta"] for s in iter_samples(shards["synth_mcq"])]
    assert len(records) == 6
    for r in records:
        assert r["kind"] == "mcq" and r["options"][r["answer_id"]] == r["answer"]
    assert {s["meta"]["kind"] for s in iter_samples(shards["synth_open"])} == {"open"}


def test_shuffle_is_seeded_and_complete(shards):
    def keys(seed):
        return [s["meta"]["key"] for s in iter_samples(shards["finetune"], shuffle_buffer=8, seed=seed)]

    assert keys(1) == keys(1)
    assert sorted(keys(1)) == sorted(keys(2)) and keys(1) != keys(2)


def _benchmark(tmp_path):
    """An eval_data folder with a clip window, an end_frame, and a video given as a folder of frames."""
    from PIL import Image

    bench = tmp_path / "bench"
    frames = gradient_frames(40, 32, 48)  # 4 s at 10 fps; the bright bar's x position tells the frame index
    write_video(bench / "videos" / "clip.mp4", frames, fps=10, pix_fmt="yuv444p")
    (bench / "videos" / "framed").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(frames[i]).save(bench / "videos" / "framed" / f"img_{i + 1}.png")
    questions = [
        {"video_name": "clip", "question_id": "q_time", "question": "?", "time": [2.0, 3.0]},
        {"video_name": "clip", "question_id": "q_end", "question": "?", "end_frame": 10},
        {"video_name": "framed", "question_id": "q_frames", "question": "?"},
    ]
    (bench / "test_q.json").write_text(json.dumps(questions))
    (bench / "test_a.json").write_text(
        json.dumps([{"question_id": q["question_id"], "answer": "a"} for q in questions])
    )
    return bench, frames


def _bar_position(frame):
    return int(np.argmax(frame[frame.shape[0] // 2, :, 0] > 180))


def test_clip_windows_and_frame_folders(tmp_path):
    bench, frames = _benchmark(tmp_path)
    write_shards(collect_items(bench), tmp_path / "out", ShardSettings(frame_counts=(4,), size=32, frame_format="npy"))
    by_key = {s["meta"]["key"]: s for s in iter_samples(tmp_path / "out")}
    expected_bar = [_bar_position(frames[i]) for i in range(40)]

    def indices(key):  # the source frame index of each stored frame, read back from the bar position
        sample = by_key[key]
        pos = sample["meta"]["frame_positions"]["4"]
        return [expected_bar.index(_bar_position(sample["frames"][p])) for p in pos]

    assert all(20 <= i <= 30 for i in indices("q_time")), indices("q_time")  # 2.0 s - 3.0 s at 10 fps
    assert all(i < 10 for i in indices("q_end")), indices("q_end")
    assert indices("q_frames") == [1, 4, 7, 10]  # 12 frames in natural order (img_2 before img_10)


def _frame_folder_benchmark(root, name: str, windows: dict[str, list[float]]):
    """A benchmark ``name`` whose video is a folder of 30 PNG frames (the bar's position tells the index)."""
    from PIL import Image

    bench = root / name
    frames = gradient_frames(30, 32, 48)
    (bench / "videos" / "clip").mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(bench / "videos" / "clip" / f"{i:05d}.png")
    questions = [{"video_name": "clip", "question_id": q, "question": "?", "time": t} for q, t in windows.items()]
    (bench / "test_q.json").write_text(json.dumps(questions))
    (bench / "test_a.json").write_text(json.dumps([{"question_id": q, "answer": "a"} for q in windows]))
    return bench, [_bar_position(f) for f in frames]


def test_vlep_frame_folders_are_read_at_3_fps(tmp_path):
    """VLEP's videos are folders of frames at 3 fps (the original reads them so): the window 2 s - 4 s is frames
    6-12, where the original's frame list np.linspace(2 * 3, 4 * 3 - 1, n) lies; at 1 fps it would be frames 2-4."""
    windows = {"q1": [2.0, 4.0], "q2": [7.5, 9.0]}
    for name in ("vlep", "other"):
        bench, bars = _frame_folder_benchmark(tmp_path, name, windows)
        write_shards(collect_items(bench), tmp_path / f"{name}-out", ShardSettings((4,), 32, frame_format="npy"))
        for sample in iter_samples(tmp_path / f"{name}-out"):
            meta = sample["meta"]
            got = [bars.index(_bar_position(sample["frames"][p])) for p in meta["frame_positions"]["4"]]
            start, end = windows[meta["key"]]
            fps = 3 if name == "vlep" else 1  # unregistered benchmarks' folders: 1 frame a second
            window = range(math.floor(start * fps), math.floor(end * fps) + 1)
            original = np.linspace(start * fps, min(29, end * fps - 1), 4, dtype=int)  # the original's frames
            assert set(original) <= set(window) and set(got) <= set(window) and got == sorted(got), (name, got)


def test_changed_items_with_the_same_keys_start_over(tmp_path):
    """A shard is resumed only for the same items: another frame rate, window or text under the same keys redoes it
    (the frames or the record would differ)."""
    bench, _ = _frame_folder_benchmark(tmp_path, "vlep", {"q1": [2.0, 4.0]})
    settings = ShardSettings((4,), 32, frame_format="npy")
    items = collect_items(bench)
    assert items[0].folder_fps == 3.0
    write_shards(items, tmp_path / "out", settings)
    assert write_shards(items, tmp_path / "out", settings).resumed_items == 1
    for change in ({"folder_fps": 1.0}, {"time": (0.0, 1.0)}, {"record": {**items[0].record, "question": "!"}}):
        assert write_shards([dataclasses.replace(items[0], **change)], tmp_path / "out", settings).resumed_items == 0
        write_shards(items, tmp_path / "out", settings)


def test_images_become_one_frame_clips(tmp_path):
    from PIL import Image

    Image.fromarray(gradient_frames(1, 40, 30)[0]).save(tmp_path / "pic.jpg")
    sample = {"id": "img1", "image": "pic.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}]}
    (tmp_path / "train.json").write_text(json.dumps([sample]))
    write_shards(collect_items(tmp_path / "train.json"), tmp_path / "out", ShardSettings(**NPY))
    (s,) = list(iter_samples(tmp_path / "out"))
    assert s["frames"].shape == (1, 85, 64, 3), "40 x 30 -> short side 64, aspect kept"
    assert s["meta"]["frame_positions"] == {"4": [0] * 4, "8": [0] * 8}


def test_non_square_videos_are_stored_with_their_aspect_ratio(tmp_path):
    write_video(tmp_path / "vids" / "wide.mp4", gradient_frames(8, 36, 64))
    write_video(tmp_path / "vids" / "tall.mp4", gradient_frames(8, 64, 36))
    write_shards(collect_items([tmp_path / "vids"]), tmp_path / "out", ShardSettings(frame_counts=(4,), size=18))
    shapes = {s["meta"]["key"]: s["frames"].shape for s in iter_samples(tmp_path / "out")}
    assert shapes == {"wide": (4, 18, 32, 3), "tall": (4, 32, 18, 3)}
    assert read_manifest(tmp_path / "out")["settings"]["resize"] == "short_side"


def test_folder_of_videos_input(tmp_path):
    for name in ("b", "a", "sub/c"):
        write_video(tmp_path / "vids" / f"{name}.mp4", gradient_frames(8, 32, 32))
    items = collect_items([tmp_path / "vids"])
    assert [it.key for it in items] == ["a", "b", "sub_c"]
    summary = write_shards(items, tmp_path / "out", ShardSettings(frame_counts=(4,), size=32))
    assert summary.good == 3


@pytest.fixture
def with_bad_items(synth_dir, tmp_path):
    good = collect_items(synth_dir / "train" / "align.json")[:4]
    bad = make_bad_inputs(tmp_path / "bad", good[0].media)
    items = good[:2] + [Item(f"bad_{k}", p, {"conversations": []}) for k, p in bad.items()] + good[2:]
    return items, bad


def test_bad_items_are_quarantined_not_fatal(with_bad_items, tmp_path):
    items, bad = with_bad_items
    summary = write_shards(items, tmp_path / "out", ShardSettings(**NPY), strict=False)
    assert (summary.input, summary.good, summary.bad) == (len(items), 4, len(bad))
    assert summary.good + summary.bad == summary.input
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    reasons = {line["source"]: line["reason"] for line in lines}
    assert set(reasons) == {str(p) for p in bad.values()}
    assert reasons[str(bad["missing"])] == "file not found"
    assert reasons[str(bad["zero_byte"])] == "file is empty (0 bytes)"
    assert reasons[str(bad["audio_only"])] == "no video stream (streams: audio)"
    assert reasons[str(bad["unreadable"])] == "not a regular file"
    for kind in ("corrupt", "truncated", "not_a_video"):
        assert reasons[str(bad[kind])].startswith(("not a decodable video", "decoding failed")), kind
    assert reasons[str(bad["zero_frames"])].startswith(("no video stream", "video has no frames"))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["bad"] == len(bad) and sum(manifest["by_reason"].values()) == len(bad)
    assert {s["meta"]["key"] for s in iter_samples(tmp_path / "out")} == {it.key for it in items if "bad" not in it.key}


def test_strict_fails_on_the_first_bad_item(with_bad_items, tmp_path):
    items, bad = with_bad_items
    with pytest.raises(VideoError, match="corrupt.mp4"):
        write_shards(items, tmp_path / "out", ShardSettings(**NPY), strict=True)
    assert not list((tmp_path / "out").glob("*.tmp")), "no half-written shard is left"


def test_parallel_workers_write_the_same_bytes(with_bad_items, tmp_path):
    items, _ = with_bad_items
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=60_000)
    write_shards(items, tmp_path / "one", settings, workers=1, strict=False)
    write_shards(items, tmp_path / "two", settings, workers=2, strict=False)
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert len(one["shards"]) > 1 and one["shards"] == two["shards"]
    assert (tmp_path / "one" / "quarantine.jsonl").read_text() == (tmp_path / "two" / "quarantine.jsonl").read_text()


def _many_items(synth_dir, tmp_path, n):
    """``n`` training samples in the mix of stage-2 data: videos (the synthetic ones), every third sample text-only
    (no 'video' or 'image' key, as in LLaVA-665k) and every fifth other one an image."""
    from PIL import Image

    base = json.loads((synth_dir / "train" / "finetune.json").read_text())
    shutil.copytree(synth_dir / "train" / "videos", tmp_path / "videos", dirs_exist_ok=True)
    Image.fromarray(gradient_frames(1, 40, 30)[0]).save(tmp_path / "pic.png")
    samples = []
    for i in range(n):
        sample = dict(base[i % len(base)], id=f"s{i:04d}")
        if i % 3 == 1:
            del sample["video"]
        elif i % 5 == 2:
            del sample["video"]
            sample["image"] = "pic.png"
        samples.append(sample)
    (tmp_path / "train.json").write_text(json.dumps(samples))
    return tmp_path / "train.json"


def test_text_only_image_and_video_samples_shard_together(synth_dir, tmp_path, capsys):
    from merv.cli import main

    items = collect_items(_many_items(synth_dir, tmp_path, 15))
    assert [it.modality for it in items[:4]] == ["video", "text", "image", "video"]
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=60_000)
    one = write_shards(items, tmp_path / "one", settings, workers=1, strict=True)
    two = write_shards(items, tmp_path / "two", settings, workers=2, strict=True)
    assert one.bad == 0 and one.by_modality == two.by_modality == {"video": 8, "image": 2, "text": 5}
    assert "15 items: 15 good, 0 bad (none) in 3 shards (good by modality: video 8, image 2, text 5)" in one.line()
    manifest = read_manifest(tmp_path / "one")
    assert manifest["text_only"] == 5 and manifest["samples"] == 15 and manifest["bad"] == 0
    assert len(manifest["shards"]) > 1 and manifest["shards"] == read_manifest(tmp_path / "two")["shards"]
    assert (tmp_path / "one" / "quarantine.jsonl").read_text() == ""
    samples = {s["meta"]["key"]: s for s in iter_samples(tmp_path / "one")}
    assert samples["s0001"]["frames"] is None and samples["s0001"]["meta"]["modality"] == "text"
    assert "frame_positions" not in samples["s0001"]["meta"] and samples["s0001"]["meta"]["conversations"]
    assert samples["s0002"]["meta"]["modality"] == "image" and samples["s0002"]["frames"].shape[0] == 1
    assert samples["s0000"]["meta"]["modality"] == "video" and samples["s0000"]["frames"].shape[0] == 12

    assert main(["inspect", str(tmp_path / "one")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["text_only"] == 5 and summary["by_modality"]["image"] == 2
    assert main(["inspect", str(tmp_path / "one"), "--sample", "s0001"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["frames"] is None and shown["modality"] == "text"


def _shard_cmd(src, out):
    cmd = [sys.executable, "-m", "merv.cli", "shard", str(src), "--out", str(out), "--frames", "4", "8"]
    return cmd + ["--size", "64", "--shard-size", "100KB", "--frame-format", "npy", "--no-progress"]


def test_killed_run_resumes_to_identical_shards(synth_dir, tmp_path):
    src = _many_items(synth_dir, tmp_path, 60)  # text-only and image samples among the videos
    assert subprocess.run(_shard_cmd(src, tmp_path / "full"), capture_output=True).returncode == 0
    proc = subprocess.Popen(_shard_cmd(src, tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "shard-000005.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    workers = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "manifest.json").exists(), "the run was killed before it finished"
    assert workers, "the run had its pool of workers"
    deadline = time.time() + 30
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers), "the killed run's workers die with it"
    res = subprocess.run(_shard_cmd(src, tmp_path / "cut"), capture_output=True, text=True)
    assert res.returncode == 0 and "already sharded" in res.stderr
    resumed = int(res.stderr.split("; ")[1].split()[0])
    assert 0 < resumed < 60
    full, cut = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "cut")
    assert cut["shards"] == full["shards"]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_new_videos_only_add_shards(synth_dir, tmp_path):
    items = collect_items(synth_dir / "train" / "align.json")
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=100_000, frame_format="npy")
    first = write_shards(items[:8], tmp_path / "out", settings)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.tar")}
    second = write_shards(items, tmp_path / "out", settings)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.tar")}
    assert second.resumed_items == 8 and second.good == 12 and second.shards > first.shards
    assert all(after[name] == mtime for name, mtime in before.items()), "existing shards are not rewritten"


def test_changed_settings_start_over(synth_dir, tmp_path):
    items = collect_items(synth_dir / "train" / "align.json")[:3]
    write_shards(items, tmp_path / "out", ShardSettings(frame_counts=(4,), size=32))
    summary = write_shards(items, tmp_path / "out", ShardSettings(frame_counts=(4,), size=48))
    assert summary.resumed_items == 0
    assert read_manifest(tmp_path / "out")["settings"]["size"] == 48


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"id": "x", "video": "a.mp4"}]', "sample 0: expected an object with a 'conversations' list"),
        ('[{"id": "x", "video": ["a.mp4", "b.mp4"], "conversations": []}]', "sample 0 .*'video' is a list"),
        ('[{"id": "x", "image": "", "conversations": []}]', "'image' must be a non-empty path"),
    ],
)
def test_bad_training_json(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        collect_items(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"backend": "ffmpeg"}, "unknown decoding backend 'ffmpeg'"), ({"resize": "square"}, "resize must be")],
)
def test_bad_shard_settings(change, message):
    with pytest.raises(ValueError, match=message):
        ShardSettings(frame_counts=(4,), size=32, **change)


def test_question_without_answer(tmp_path):
    (tmp_path / "test_q.json").write_text(json.dumps([{"video_name": "v", "question_id": "q1", "question": "?"}]))
    (tmp_path / "test_a.json").write_text("[]")
    with pytest.raises(DataFormatError, match="question 'q1' has no answer"):
        collect_items(tmp_path)


def test_duplicate_keys_across_inputs(synth_dir):
    src = synth_dir / "train" / "align.json"
    with pytest.raises(DataFormatError, match="duplicate sample keys"):
        collect_items([src, src])


def test_unknown_input_kind(tmp_path):
    with pytest.raises(DataFormatError, match="no video or image files"):
        collect_items(tmp_path)
    with pytest.raises(DataFormatError, match="not a training JSON"):
        collect_items(tmp_path / "nothing.txt")


def test_a_changed_item_is_redone_and_only_it(synth_dir, tmp_path):
    """The issue's re-shard: a label fixed, a video replaced in place and a broken video mended, then `merv shard`
    into the same folder. Before, shards were matched by item id, so the old text and frames were kept and the mended
    video stayed quarantined. Now items are matched by content: exactly those three are decoded again, the others are
    copied from the old shards, and the result is the same bytes as sharding the changed inputs from scratch."""
    shutil.copytree(synth_dir / "train" / "videos", tmp_path / "videos")
    samples = json.loads((synth_dir / "train" / "align.json").read_text())[:8]
    samples[6]["video"] = "videos/broken.mp4"
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"")
    (tmp_path / "train.json").write_text(json.dumps(samples))
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=300_000, frame_format="npy")
    first = write_shards(collect_items(tmp_path / "train.json"), tmp_path / "out", settings, strict=False)
    assert (first.good, first.bad) == (7, 1) and first.shards > 2

    samples[1]["conversations"][1]["value"] = "A corrected label."
    replaced = tmp_path / samples[4]["video"]
    shutil.copy(synth_dir / "train" / "videos" / "train_00011.mp4", replaced)  # another clip, in place
    shutil.copy(synth_dir / "train" / "videos" / "train_00010.mp4", tmp_path / "videos" / "broken.mp4")
    (tmp_path / "train.json").write_text(json.dumps(samples))
    items = collect_items(tmp_path / "train.json")
    decoded = []  # by the first rerun, killed after its first new shard (its rerun resumes from there)
    with pytest.MonkeyPatch.context() as mp:
        real_commit, real_encode = shards_module._Shard.commit, shards_module.encode_with_media

        def commit_then_die(self):
            real_commit(self)
            raise KeyboardInterrupt

        mp.setattr(shards_module._Shard, "commit", commit_then_die)
        mp.setattr(
            shards_module, "encode_with_media", lambda item, st: decoded.append(item.key) or real_encode(item, st)
        )
        with pytest.raises(KeyboardInterrupt):
            write_shards(items, tmp_path / "out", settings)
    assert (tmp_path / "out" / ".reuse").is_dir(), "the old shards wait there to be copied from"
    second = write_shards(items, tmp_path / "out", settings, workers=2)

    stored = {s["meta"]["key"]: s for s in iter_samples(tmp_path / "out")}
    assert stored[items[1].key]["meta"]["conversations"][1]["value"] == "A corrected label."
    direct, _ = read_frames(replaced, [4, 8], 64)
    assert np.array_equal(stored[items[4].key]["frames"], direct), "the replaced video's frames"
    assert second.bad == 0 and items[6].key in stored, "the mended video is no longer quarantined"
    assert (tmp_path / "out" / "quarantine.jsonl").read_text() == ""
    assert sorted(decoded + second.encoded_keys) == sorted(items[i].key for i in (1, 4, 6)), "only the changed items"
    fresh = write_shards(items, tmp_path / "fresh", settings)
    assert fresh.encoded_keys == [it.key for it in items]
    assert read_manifest(tmp_path / "out")["shards"] == read_manifest(tmp_path / "fresh")["shards"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (tmp_path / "fresh").iterdir()
    )


def test_a_touched_or_copied_video_is_not_decoded_again(synth_dir, tmp_path):
    """Same bytes, new metadata (touched, or the dataset copied elsewhere): the media is hashed, found unchanged, and
    every shard is kept as it was."""
    shutil.copytree(synth_dir / "train", tmp_path / "a")
    settings = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=300_000, frame_format="npy")
    write_shards(collect_items(tmp_path / "a" / "align.json"), tmp_path / "out", settings)
    tars = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    os.utime(tmp_path / "a" / "videos" / "train_00002.mp4")
    again = write_shards(collect_items(tmp_path / "a" / "align.json"), tmp_path / "out", settings)
    assert again.encoded_keys == [] and again.resumed_items == 12
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")} == tars


def test_scale_in_decoder_is_keyed_and_reruns_both_ways(synth_dir, tmp_path):
    """The option is in the shards' fingerprint once on (flipping it redoes every item, with other frames), and out of
    it while off, so that shards written before the option existed keep their fingerprint and are not redone."""
    from merv.cli import main

    items = collect_items(synth_dir / "train" / "align.json")[:3]
    exact = ShardSettings(frame_counts=(4, 8), size=48)
    assert set(exact.record()) == {"frame_counts", "size", "target_bytes", "frame_format", "jpeg_quality", "backend",
                                   "resize", "digests"}, "the fields of every earlier shard folder"  # fmt: skip
    scaled = dataclasses.replace(exact, scale_in_decoder=True)
    assert scaled.record()["scale_in_decoder"] is True and scaled.fingerprint() != exact.fingerprint()

    out = tmp_path / "out"
    first = write_shards(items, out, exact)
    before = read_manifest(out)
    assert len(first.encoded_keys) == 3 and "scale_in_decoder" not in before["settings"]
    argv = ["shard", str(synth_dir / "train" / "align.json"), "--out", str(out), "--frames", "4", "8", "--size", "48"]
    assert main([*argv, "--scale-in-decoder", "-q"]) == 0  # the command: 12 items, all decoded again
    flipped = read_manifest(out)
    assert flipped["settings"]["scale_in_decoder"] is True and flipped["fingerprint"] == scaled.fingerprint()
    assert flipped["shards"][0]["sha256"] != before["shards"][0]["sha256"]
    again = write_shards(items, out, exact)
    assert again.resumed_items == 0 and len(again.encoded_keys) == 3
    assert read_manifest(out) == before, "back to the exact resize: the same bytes as the first run"
    assert write_shards(items, out, exact).resumed_items == 3, "unchanged settings: nothing redone"
