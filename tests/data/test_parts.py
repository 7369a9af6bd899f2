"""Scatter–gather sharding: the part rule, the plan, and a gathered folder read like one written in one piece."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from merv.data.parts import gather_parts, part_digest, part_ranges, plan_parts, read_plan, refresh_part_indexes
from merv.data.reader import sample_keys
from merv.data.shards import DataFormatError, ShardSettings, collect_items, iter_samples, read_manifest, write_shards

NPY = ShardSettings(frame_counts=(4, 8), size=64, target_bytes=300_000, frame_format="npy")


def test_parts_are_fixed_ranges_of_the_input_order_and_appending_keeps_the_full_ones():
    assert part_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert part_ranges(0, 3) == [] and part_ranges(3, 3) == [range(0, 3)]
    before, after = part_ranges(700_000, 5000), part_ranges(750_001, 5000)
    assert len(before) == 140 and len(after) == 151 and after[:140] == before
    with pytest.raises(ValueError, match="items_per_part must be positive"):
        part_ranges(5, 0)


def _split(tmp_path: Path, synth_dir: Path, samples: list[dict]) -> Path:
    """A training JSON in its own folder whose videos are the synthetic ones (media paths relative to it)."""
    path = tmp_path / "split" / "train.json"
    path.parent.mkdir(exist_ok=True)
    (path.parent / "videos").mkdir(exist_ok=True)
    for s in samples:
        if isinstance(s.get("video"), str) and not (path.parent / s["video"]).exists():
            (path.parent / s["video"]).symlink_to(synth_dir / "train" / s["video"])
    path.write_text(json.dumps(samples))
    return path


def _samples(synth_dir: Path) -> list[dict]:
    samples = json.loads((synth_dir / "train" / "finetune.json").read_text())
    for s in samples[::4]:
        s.pop("id")  # a sample without id is keyed by its position in the whole JSON, also inside a part
    samples.insert(5, {"id": "text_only", "conversations": samples[0]["conversations"]})
    return samples


def test_plan_writes_each_part_once_and_appending_leaves_the_full_parts_unchanged(synth_dir, tmp_path):
    samples = _samples(synth_dir)  # 13 samples
    source = _split(tmp_path, synth_dir, samples)
    plan = plan_parts(source, tmp_path / "plan", 5)
    assert plan["parts"] == ["part-00000", "part-00001", "part-00002"] and plan["items"] == 13
    assert read_plan(tmp_path / "plan") == plan
    whole = collect_items(source)
    by_part = [it for p in plan["parts"] for it in collect_items(tmp_path / "plan" / f"{p}.json", source.parent)]
    assert by_part == whole, "a part's items (keys, records, media) are the whole JSON's"
    digests = {p: part_digest(tmp_path / "plan", p) for p in plan["parts"]}
    mtimes = {p: (tmp_path / "plan" / f"{p}.json").stat().st_mtime_ns for p in plan["parts"]}

    source.write_text(json.dumps(samples + [{**samples[1], "id": "appended"}]))
    plan = plan_parts(source, tmp_path / "plan", 5)
    after = {p: part_digest(tmp_path / "plan", p) for p in plan["parts"]}
    assert after["part-00000"] == digests["part-00000"] and after["part-00001"] == digests["part-00001"]
    assert after["part-00002"] != digests["part-00002"], "the short last part took the appended sample"
    assert (tmp_path / "plan" / "part-00001.json").stat().st_mtime_ns == mtimes["part-00001"], "not rewritten"

    plan = plan_parts(source, tmp_path / "plan", 7)  # fewer, larger parts: the stale part's files go
    assert plan["parts"] == ["part-00000", "part-00001"] and not (tmp_path / "plan" / "part-00002.json").exists()


def test_a_replaced_video_changes_only_its_parts_digest(synth_dir, tmp_path):
    samples = _samples(synth_dir)
    source = _split(tmp_path, synth_dir, samples)
    plan = plan_parts(source, tmp_path / "plan", 5)
    before = {p: part_digest(tmp_path / "plan", p) for p in plan["parts"]}
    assert refresh_part_indexes(tmp_path / "plan") == []
    video = source.parent / samples[7]["video"]  # in part 1
    video.unlink()
    video.write_bytes((synth_dir / "train" / samples[0]["video"]).read_bytes())
    assert refresh_part_indexes(tmp_path / "plan") == ["part-00001"]
    after = {p: part_digest(tmp_path / "plan", p) for p in plan["parts"]}
    assert [p for p in before if before[p] != after[p]] == ["part-00001"]


def test_a_bad_json_is_named_with_the_sample(synth_dir, tmp_path):
    samples = _samples(synth_dir)
    samples[3] = {"id": "x", "video": ["a.mp4", "b.mp4"], "conversations": []}
    source = _split(tmp_path, synth_dir, samples)
    with pytest.raises(DataFormatError, match=r"train.json sample 3 .*is a list"):
        plan_parts(source, tmp_path / "plan", 5)


def _members(folder: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                out[m.name] = t.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def one_and_gathered(synth_dir, tmp_path_factory):
    """The same training JSON (a bad video, a text-only sample) sharded in one piece and in 3 parts, gathered."""
    tmp = tmp_path_factory.mktemp("parts")
    samples = _samples(synth_dir)
    samples[8]["video"] = "videos/missing.mp4"  # quarantined, in part 1
    source = _split(tmp, synth_dir, samples)
    write_shards(collect_items(source), tmp / "one", NPY, strict=False)
    plan = plan_parts(source, tmp / "plan", 5)
    parts = []
    for p in plan["parts"]:
        write_shards(collect_items(tmp / "plan" / f"{p}.json", source.parent), tmp / "parts" / p, NPY, strict=False)
        parts.append(tmp / "parts" / p)
    gather_parts(parts, tmp / "gathered")
    return tmp / "one", tmp / "gathered", parts


def test_gathered_folder_has_the_one_piece_samples_counts_and_quarantine(one_and_gathered):
    one, gathered, parts = one_and_gathered
    a, b = read_manifest(one), read_manifest(gathered)
    for key in ("samples", "input", "bad", "by_reason", "by_modality", "text_only", "settings", "fingerprint"):
        assert a[key] == b[key], key
    assert b["input"] == 13 and b["bad"] == 1 and b["text_only"] == 1
    assert [p["part"] for p in b["parts"]] == ["part-00000", "part-00001", "part-00002"]
    assert (one / "quarantine.jsonl").read_bytes() == (gathered / "quarantine.jsonl").read_bytes()
    assert sample_keys(one) == sample_keys(gathered)
    assert _members(one) == _members(gathered), "every sample's members, byte for byte"
    # the gathered tars are the parts' own files (hard links), listed with their checksums
    names = [s["name"] for s in b["shards"]]
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))]
    first = parts[0] / read_manifest(parts[0])["shards"][0]["name"]
    assert (gathered / names[0]).stat().st_ino == first.stat().st_ino
    for one_sample, gathered_sample in zip(iter_samples(one), iter_samples(gathered), strict=True):
        assert one_sample["meta"] == gathered_sample["meta"]
        if one_sample["frames"] is None:
            assert gathered_sample["frames"] is None
        else:
            assert np.array_equal(one_sample["frames"], gathered_sample["frames"])


def test_gathering_again_gives_the_same_bytes_and_refuses_mixed_settings(one_and_gathered, synth_dir, tmp_path):
    _, gathered, parts = one_and_gathered
    gather_parts(parts, tmp_path / "again")
    for path in sorted(gathered.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other"
    write_shards(
        collect_items(synth_dir / "train" / "align.json")[:2], other, ShardSettings(frame_counts=(4,), size=32)
    )
    with pytest.raises(ValueError, match="different settings"):
        gather_parts([parts[0], other], tmp_path / "mixed")


def test_loader_and_feature_extractor_read_a_gathered_split_like_a_one_piece_one(one_and_gathered, tiny_run, tmp_path):
    from merv.data.loader import ShardLoader
    from merv.features.extract import ExtractSettings, extract_features
    from merv.weights import resolve_model

    one, gathered, _ = one_and_gathered

    def epoch(folder):
        """Keys and frames an epoch of the training loader yields (its order shuffles shards, whose boundaries differ
        between the two folders: compared by key)."""
        loader = ShardLoader(folder, lambda s: s, lambda b: b, 4, shuffle_buffer=0)
        samples = [s for batch in loader.epoch(0) for s in batch]
        return {s["meta"]["key"]: (s["meta"], None if s["frames"] is None else s["frames"].tobytes()) for s in samples}

    a, b = epoch(one), epoch(gathered)
    assert len(a) == 12 and a == b

    model = resolve_model(tiny_run.model)
    enc = model.encoders[0].id
    settings = ExtractSettings(dtype="fp32", batch_size=5)
    a = extract_features(one, model, enc, tmp_path / "one", settings)
    b = extract_features(gathered, model, enc, tmp_path / "gathered", settings)
    assert a["samples"] == b["samples"] == 12
    features = _members(tmp_path / "one")
    assert len(features) >= 12 and features == _members(tmp_path / "gathered"), "the same feature bytes per sample"
