import pytest
import torch

import merv.data.loader as loader_module
from merv.data.loader import Position, ShardLoader, pieces, split_ranges, worker_order
from merv.data.shards import ShardSettings, collect_items, write_shards


def key_of(sample):
    return sample["meta"]["key"]


def keys_of(batch):
    return list(batch)


@pytest.fixture(scope="module")
def many_shards(synth_dir, tmp_path_factory):
    """12 samples in 6 shards of 2."""
    out = tmp_path_factory.mktemp("loader") / "shards"
    settings = ShardSettings(frame_counts=(4,), size=32, target_bytes=20_000, frame_format="npy")
    write_shards(collect_items(synth_dir / "train" / "align.json"), out, settings)
    return out


def make(shards, **kw):
    kw.setdefault("shuffle_buffer", 4)
    return ShardLoader(shards, transform=key_of, collate=keys_of, batch_size=kw.pop("batch_size", 3), **kw)


def test_worker_order():
    assert worker_order([3, 3]) == [0, 1, 0, 1, 0, 1]
    assert worker_order([1, 3]) == [0, 1, 1, 1], "an exhausted worker drops out of the cycle"
    assert worker_order([2, 0, 1]) == [0, 2, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_covers_every_sample_once(many_shards, workers):
    ld = make(many_shards, num_workers=workers)
    keys = [k for batch in ld.epoch(0) for k in batch]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert ld.batches_per_epoch(0) == len(list(ld.epoch(0)))


def test_ranks_get_disjoint_parts(many_shards):
    parts = [{k for b in make(many_shards, rank=r, world_size=2).epoch(0) for k in b} for r in range(2)]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 12


def test_epochs_are_reshuffled_deterministically(many_shards):
    def order(epoch, seed=0):
        return [k for b in make(many_shards, seed=seed).epoch(epoch) for k in b]

    assert order(0) == order(0) and order(0) != order(1) and order(0, seed=1) != order(0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(many_shards, workers):
    ld = make(many_shards, num_workers=workers, batch_size=2)
    full = list(ld.epoch(1))
    for start in (1, 3, len(full) - 1):
        assert list(ld.epoch(1, start_batch=start)) == full[start:]
    stream = ld(Position(1, 3))
    position, batch = next(stream)
    assert position == Position(1, 4) and batch == full[3]


def test_skipped_samples_are_not_decoded(many_shards, monkeypatch):
    decoded = []
    real = loader_module.decode_sample
    monkeypatch.setattr(loader_module, "decode_sample", lambda raw: decoded.append(1) or real(raw))
    ld = make(many_shards, batch_size=2)
    list(ld.epoch(0, start_batch=4))
    assert len(decoded) == 12 - 4 * 2


def test_too_few_samples_is_a_clear_error(many_shards):
    make(many_shards, world_size=4, num_workers=3)  # fewer shards than workers is fine: the split is by samples
    with pytest.raises(ValueError, match="12 samples cannot feed 4 ranks x 4 workers"):
        make(many_shards, world_size=4, num_workers=4)


def test_real_training_batches(tiny_model, shards):
    from merv.data.batching import collate, training_example

    ld = ShardLoader(shards["finetune"], lambda s: training_example(tiny_model, s), collate, batch_size=5)
    batch = next(iter(ld.epoch(0)))
    assert batch["videos"]["vit"].shape == (5, 4, 3, 64, 64) and batch["videos"]["vivit"].shape == (5, 8, 3, 32, 32)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["lengths"].max() == batch["input_ids"].shape[1]
    assert (batch["labels"][0, batch["lengths"][0] :] == -100).all()
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_batches_per_epoch_on_unequal_shards(unequal_shards, workers):
    """No rank runs into the next epoch while another is still in this one: per epoch, both ranks yield exactly
    ``batches_per_epoch`` batches, reads disjoint samples, and every sample is read: the split is by samples."""
    loaders = [make(unequal_shards, rank=r, world_size=2, num_workers=workers, batch_size=2) for r in range(2)]
    for epoch in range(3):
        counts = {ld.batches_per_epoch(epoch) for ld in loaders}
        assert len(counts) == 1
        batches = [list(ld.epoch(epoch)) for ld in loaders]
        assert [len(b) for b in batches] == [counts.pop()] * 2
        keys = [{k for b in bs for k in b} for bs in batches]
        held = [sum(p.count for part in ld.pieces_by_worker(epoch) for p in part) for ld in loaders]
        assert held == [6, 6]
        assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == sum(len(b) for bs in batches for b in bs)
        assert len(keys[0] | keys[1]) == 12, "no sample sits out the epoch"
    # positions after the same number of batches are the same on both ranks, across epochs
    streams = [ld() for ld in loaders]
    for _ in range(3 * loaders[0].batches_per_epoch(0)):
        positions = [next(s)[0] for s in streams]
        assert positions[0] == positions[1]


def test_split_ranges_and_pieces_cut_the_sample_sequence_across_shard_boundaries():
    assert split_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)] and split_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]
    shards = [{"name": "a", "samples": 3}, {"name": "b", "samples": 2}, {"name": "c", "samples": 4}]
    got = [(p.shard["name"], p.first, p.count) for p in pieces(shards, 2, 7)]
    assert got == [("a", 2, 1), ("b", 0, 2), ("c", 0, 2)]
    assert pieces(shards, 3, 3) == []


def random_draws(sample):
    """A transform drawing from every global RNG a worker has (as a random augmentation would)."""
    import random

    import numpy as np

    return (key_of(sample), random.random(), float(np.random.rand()), float(torch.rand(())))


def test_worker_rngs_are_seeded_by_seed_epoch_rank_and_worker(many_shards):
    """Draws from the global RNGs in DataLoader workers repeat run after run (not taken from the parent's state)
    and differ between workers and epochs."""

    def draws(epoch, seed=0):
        ld = ShardLoader(many_shards, transform=random_draws, collate=list, batch_size=3, num_workers=2, seed=seed)
        return [d for batch in ld.epoch(epoch) for d in batch]

    torch.manual_seed(1)  # the parent's RNG state differs between the two runs
    first = draws(0)
    torch.rand(5)
    assert draws(0) == first
    values = [v for d in first for v in d[1:]]
    assert len(set(values)) == len(values), "every worker and draw gets its own numbers"
    assert draws(1) != first and draws(0, seed=1) != first
