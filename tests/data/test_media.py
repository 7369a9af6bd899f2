"""The media index the pipeline plans with (merv.data.media): rewritten exactly when a source's media change."""

from __future__ import annotations

import json
import os
import shutil

from merv.data.media import build_index, refresh_index, write_index


def test_an_index_is_rewritten_only_when_the_media_change(synth_dir, tmp_path):
    shutil.copytree(synth_dir / "train", tmp_path / "train")
    shutil.copytree(synth_dir / "eval_data" / "synth_mcq", tmp_path / "bench")
    for source in (tmp_path / "train" / "align.json", tmp_path / "bench"):
        out = tmp_path / f"{source.stem}.index.json"
        write_index(build_index(source), out)
        listed = [p for p, _, _ in json.loads(out.read_text())["media"]]
        assert len(listed) == (12 if source.suffix == ".json" else 6), listed
        mtime = out.stat().st_mtime_ns
        assert not refresh_index(out) and out.stat().st_mtime_ns == mtime, "nothing changed: not rewritten"
        video = sorted(p for p in listed if p.endswith(".mp4"))[0]
        others = sorted(p for p in listed if p != video)
        shutil.copy(others[0], video)  # replaced in place
        assert refresh_index(out) and not refresh_index(out)
        os.utime(video, ns=(1, 1))  # touched back in time: still a change
        assert refresh_index(out)
    # a training JSON that now lists another video: the index follows the JSON
    samples = json.loads((tmp_path / "train" / "align.json").read_text())
    samples[0]["video"] = "videos/train_00011.mp4"
    (tmp_path / "train" / "align.json").write_text(json.dumps(samples))
    index = tmp_path / "align.index.json"
    assert refresh_index(index)
    assert all("train_00000.mp4" not in p for p, _, _ in json.loads(index.read_text())["media"])
    # a file added to a benchmark's videos/ folder
    shutil.copy(synth_dir / "train" / "videos" / "train_00001.mp4", tmp_path / "bench" / "videos" / "extra.mp4")
    assert refresh_index(tmp_path / "bench.index.json")


def test_an_unreadable_source_is_left_to_sharding_to_report(tmp_path):
    """The index only triggers the shard job, which names a broken training JSON; indexing it does not fail."""
    (tmp_path / "train.json").write_text("[{]")
    index = build_index(tmp_path / "train.json")
    assert index["media"] == [] and "not valid JSON" in index["problem"]
