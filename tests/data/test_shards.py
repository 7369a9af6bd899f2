import json

import numpy as np
import pytest

from merv.data.shards import DataFormatError, collect_items, iter_samples, read_manifest, write_shards
from merv.data.video import VideoError, read_frames


def test_training_shards_roundtrip(shards, synth_dir):
    manifest = read_manifest(shards["finetune"])
    assert manifest["samples"] == 12
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["settings"]["frame_counts"] == [4, 8]
    samples = list(iter_samples(shards["finetune"]))
    assert len(samples) == 12 and len({s["meta"]["key"] for s in samples}) == 12
    first = samples[0]
    direct, positions = read_frames(first["meta"]["source"], [4, 8], 64)
    assert np.array_equal(first["frames"], direct), "shard holds exactly the decoded frames"
    assert first["meta"]["frame_positions"] == {str(c): p for c, p in positions.items()}
    assert first["meta"]["conversations"][0]["from"] == "human"


def test_benchmark_shards_join_questions_and_answers(shards):
    records = [s["meta"] for s in iter_samples(shards["synth_mcq"])]
    assert len(records) == 6
    for r in records:
        assert r["kind"] == "mcq" and r["options"][r["answer_id"]] == r["answer"]
    assert {r["kind"] for r in (s["meta"] for s in iter_samples(shards["synth_open"]))} == {"open"}


def test_shuffle_is_seeded_and_complete(shards):
    keys = lambda seed: [s["meta"]["key"] for s in iter_samples(shards["finetune"], shuffle_buffer=8, seed=seed)]  # noqa: E731
    assert keys(1) == keys(1)
    assert sorted(keys(1)) == sorted(keys(2)) and keys(1) != keys(2)


def test_sharding_is_deterministic(synth_dir, tmp_path):
    items = collect_items(synth_dir / "train" / "align.json")[:4]
    a = write_shards(items, tmp_path / "a", frame_counts=[4], size=32, samples_per_shard=3)
    b = write_shards(items, tmp_path / "b", frame_counts=[4], size=32, samples_per_shard=3)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["fingerprint"] == b["fingerprint"]
    assert not list((tmp_path / "a").glob("*.tmp")), "no temp files left behind"


def test_corrupt_video_names_the_file(synth_dir, tmp_path):
    items = collect_items(synth_dir / "train" / "align.json")[:2]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 50)
    items[1] = type(items[1])(items[1].key, bad, items[1].record)
    with pytest.raises(VideoError, match="broken.mp4"):
        write_shards(items, tmp_path / "out", frame_counts=[4], size=32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"id": "x", "video": "a.mp4"}]', "sample 0: expected an object with 'conversations'"),
        ('[{"id": "x", "conversations": []}]', "no 'video' or 'image' path"),
    ],
)
def test_bad_training_json(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        collect_items(path)


def test_question_without_answer(tmp_path):
    (tmp_path / "test_q.json").write_text(json.dumps([{"video_name": "v", "question_id": "q1", "question": "?"}]))
    (tmp_path / "test_a.json").write_text("[]")
    with pytest.raises(DataFormatError, match="question 'q1' has no answer"):
        collect_items(tmp_path)


def test_unknown_input_kind(tmp_path):
    with pytest.raises(DataFormatError, match="neither a training JSON"):
        collect_items(tmp_path)
