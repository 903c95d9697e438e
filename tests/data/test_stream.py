"""TrainStream on real WebDataset shards: equal batch counts, disjoint ranks, exact resume, re-split."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from itertools import islice

import pytest
import torch

from llara_dist.data.shards import check_shards, load_meta, read_split, tar_bytes
from llara_dist.data.stream import TrainStream, canonical_ranges, digit_reversal
from llara_dist.errors import DataError

BS = 8


def _stream(shards, rank=0, world_size=1, **kw) -> TrainStream:
    args = dict(batch_size=BS, rank=rank, world_size=world_size, seed=5, shuffle_buffer=300, num_candidates=20)
    args.update(kw)
    return TrainStream(shards, **args)


def _keys(batches) -> list[list[str]]:
    return [[s["key"] for s in b] for b in batches]


def _epoch(stream) -> list[list[dict]]:
    return list(islice(iter(stream), stream.batches_per_epoch))


@pytest.fixture(scope="module")
def single(tiny_shards):
    """World size 1, epoch 0 and 1: the global order every other world size must reproduce."""
    s = _stream(tiny_shards)
    batches = list(islice(iter(s), 2 * s.batches_per_epoch))
    return s, batches


def _global(parts: list[list[list[str]]], offset: int = 0) -> list[str]:
    """The ranks' batches put back in global order: rank r holds positions g % world == r."""
    ws = len(parts)
    out = {}
    for r, part in enumerate(parts):
        for i, batch in enumerate(part):
            base = offset + i * ws * BS
            for t, key in enumerate(batch):
                out[base + (r - base) % ws + t * ws] = key
    assert sorted(out) == list(range(offset, offset + len(out)))
    return [out[g] for g in sorted(out)]


def _shard_bytes(shards) -> list[int]:
    return [(shards / e["name"]).stat().st_size for e in load_meta(shards)["shards"]["train"]]


def test_uneven_shards_give_equal_disjoint_rank_parts(tiny_shards, single):
    meta = load_meta(tiny_shards)
    sizes = [e["samples"] for e in meta["shards"]["train"]]
    assert len(set(sizes)) > 1  # the last shard is short: an uneven layout
    s1, ref = single
    n = meta["counts"]["train"]
    assert s1.batches_per_epoch == n // BS
    flat = [k for b in _keys(ref[: s1.batches_per_epoch]) for k in b]
    assert len(flat) == len(set(flat)) == n - n % BS  # an epoch has no repeats and drops < one batch
    for ws in (2, 3, 4):
        ranks = [_stream(tiny_shards, r, ws) for r in range(ws)]
        assert {r.batches_per_epoch for r in ranks} == {n // (ws * BS)}
        parts = [_keys(_epoch(r)) for r in ranks]
        assert all(len(p) == n // (ws * BS) for p in parts)
        seen = [k for p in parts for b in p for k in b]
        assert len(seen) == len(set(seen))  # disjoint
        glob = _global(parts)  # the world-size-independent order
        assert glob == flat[: len(glob)]


def test_each_rank_reads_about_one_over_world_of_the_bytes(tiny_shards, single):
    s1, _ = single
    sizes = _shard_bytes(tiny_shards)
    total, biggest = sum(sizes), max(sizes)
    assert s1.bytes_read == 2 * total  # world size 1 reads each shard once per epoch (2 epochs), no more
    for ws in (2, 4):
        ranks = [_stream(tiny_shards, r, ws) for r in range(ws)]
        for r in ranks:
            _epoch(r)
            # one contiguous stretch of the epoch's shard sequence, sharing at most a shard each side
            assert r.bytes_read <= total / ws + 2 * biggest, (ws, r.rank, r.bytes_read, total)
        assert sum(r.bytes_read for r in ranks) <= total + 2 * (ws - 1) * biggest
    # a world size that does not divide the canonical ranges is still exact, at more bytes per rank
    with pytest.warns(UserWarning, match="does not divide"):
        five = _stream(tiny_shards, 0, 5)
    assert five.reads_fraction == 1.0


def test_digit_reversal_gives_contiguous_ranges_for_prefix_world_sizes():
    rev = digit_reversal(192)
    assert sorted(rev.tolist()) == list(range(192))
    for world in (1, 2, 4, 8, 16, 32, 64, 192):
        for r in range(world):
            mine = sorted(rev[r::world].tolist())
            assert mine == list(range(mine[0], mine[0] + 192 // world))  # one contiguous block
    assert sorted(rev[0::3].tolist()) != list(range(64))  # 3 divides 192 but is not a prefix: scattered
    assert canonical_ranges(10 ** 6) == 192 and canonical_ranges(100) == 96 and canonical_ranges(5) == 4


def test_epochs_reshuffle_and_candidates_are_drawn(tiny_shards, single):
    s1, ref = single
    e0, e1 = _keys(ref[: s1.batches_per_epoch]), _keys(ref[s1.batches_per_epoch:])
    assert e0 != e1 and len(e1) == s1.batches_per_epoch
    # both epochs cover the same samples (up to the dropped partial batch)
    assert len(set(sum(e0, [])) & set(sum(e1, []))) > 0.95 * len(sum(e0, []))
    for s in ref[0] + ref[-1]:
        assert len(s["candidates"]) == 20 and s["candidates"].count(s["target"]) == 1
    other_seed = _stream(tiny_shards, seed=6)
    assert _keys(islice(iter(other_seed), 3)) != e0[:3]
    assert _keys(islice(iter(_stream(tiny_shards)), 3)) == e0[:3]  # same seed, same order
    # a shuffle block of 1 walks each canonical range in stored order: positions g and g + ranges
    # (the same range, next index) are mostly neighbours in one shard
    no_shuffle = _stream(tiny_shards, shuffle_buffer=1)
    flat = [k for b in _keys(islice(iter(no_shuffle), no_shuffle.batches_per_epoch)) for k in b]
    stored = {s["key"]: i for i, s in enumerate(read_split(tiny_shards, "train"))}
    r = no_shuffle.ranges
    pairs = [(stored[flat[g]], stored[flat[g + r]]) for g in range(len(flat) - r)]
    assert sum(b == a + 1 for a, b in pairs) > 0.9 * len(pairs)
    # ... while consecutive positions come from all over the data
    assert sum(abs(stored[a] - stored[b]) == 1 for a, b in zip(flat, flat[1:])) < 0.05 * len(flat)


def test_exact_resume_same_and_other_world_size(tiny_shards, single):
    s1, ref = single
    flat = [s for b in ref for s in b]
    # world size 2 trains 5 batches, checkpoints, and is resumed at world size 2, 3 and 4
    a = [_stream(tiny_shards, r, 2) for r in range(2)]
    its = [iter(x) for x in a]
    for _ in range(5):
        for it in its:
            next(it)
    state = a[0].state_dict()
    assert state == a[1].state_dict() == {"epoch": 0, "offset": 5 * 2 * BS, "ranges": a[0].ranges, "block": 300}
    cont = [next(it) for it in its]  # the uninterrupted run's next step
    resumed = [_stream(tiny_shards, r, 2) for r in range(2)]
    for x in resumed:
        x.load_state_dict(state)
    assert [next(iter(x)) for x in resumed] == cont  # same samples, same candidates
    by_key = {s["key"]: s for s in flat[: s1.batches_per_epoch * BS]}  # epoch 0
    for ws in (3, 4):  # re-split: the rest of the epoch, in the same global order, nothing repeated
        new = [_stream(tiny_shards, r, ws) for r in range(ws)]
        for x in new:
            x.load_state_dict(state)
        left = (s1.num_samples - state["offset"]) // (ws * BS)
        parts = [list(islice(iter(x), left)) for x in new]
        glob = _global([[[s["key"] for s in b] for b in p] for p in parts], state["offset"])
        assert glob == [s["key"] for s in flat[state["offset"]: state["offset"] + len(glob)]]
        got = {s["key"]: s for p in parts for b in p for s in b}
        assert all(got[k] == by_key[k] for k in glob)  # candidates too
        assert all(x.state_dict()["epoch"] == 1 and x.state_dict()["offset"] == 0 for x in new)  # epoch finished
    # the next epoch at world size 3 starts the epoch-1 global order
    e1 = [s["key"] for b in ref[s1.batches_per_epoch:] for s in b]
    fresh = [_stream(tiny_shards, r, 3) for r in range(3)]
    for x in fresh:
        x.load_state_dict({**state, "epoch": 1, "offset": 0})
    assert _global([[[s["key"] for s in next(iter(fresh[r]))]] for r in range(3)]) == e1[: 3 * BS]


def test_resume_seeks_instead_of_rereading(tiny_shards):
    """Resuming near the end of the epoch reads the blocks at the position, not the epoch so far."""
    sizes = _shard_bytes(tiny_shards)
    kw = dict(canonical=4, shuffle_buffer=50)
    ref = _stream(tiny_shards, 0, 2, **kw)
    n = ref.batches_per_epoch
    want = _keys(islice(iter(ref), n))[n - 3:]
    late = _stream(tiny_shards, 0, 2, **kw)
    late.load_state_dict({"epoch": 0, "offset": (n - 3) * 2 * BS, "ranges": 4, "block": 50})
    it = iter(late)
    assert _keys([next(it)]) == want[:1]
    # rank 0 of 2 has 2 ranges; each one's current block lies in at most 2 shards
    assert 0 < late.bytes_read <= 4 * max(sizes) < ref.bytes_read
    assert _keys([next(it), next(it)]) == want[1:]


def test_bad_and_old_states_are_refused(tiny_shards):
    s = _stream(tiny_shards, 0, 2)
    it = iter(s)
    for _ in range(s.batches_per_epoch + 3):
        next(it)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["offset"] == 3 * 2 * BS
    with pytest.raises(DataError, match="stream state"):
        s.load_state_dict({**s.state_dict(), "offset": 10 ** 9})
    with pytest.raises(DataError, match="older TrainStream"):
        s.load_state_dict({"epoch": 0, "offset": 16})  # the format before canonical ranges
    with pytest.raises(DataError, match="shuffle_buffer changed"):
        s.load_state_dict({**s.state_dict(), "block": 7})


def test_several_dataloader_workers_are_refused(tiny_shards):
    loader = torch.utils.data.DataLoader(_stream(tiny_shards, 1, 2), batch_size=None, num_workers=2,
                                         collate_fn=lambda b: b)
    with pytest.raises(RuntimeError, match="several DataLoader workers"):
        next(iter(loader))


def _copy(tiny_shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(tiny_shards, dst)
    return dst, load_meta(dst)


def test_corrupt_shard_is_named_or_skipped_and_counted(tiny_shards, tmp_path):
    d, meta = _copy(tiny_shards, tmp_path)
    bad = meta["shards"]["train"][1]
    path = d / bad["name"]
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    with pytest.raises(DataError, match=f"{bad['name']}: corrupt shard.*skip_corrupt"):
        _stream(d)
    with pytest.warns(UserWarning, match=bad["name"]):
        ranks = [_stream(d, r, 2, skip_corrupt=True) for r in range(2)]
    assert all(r.skipped_shards == [bad["name"]] for r in ranks)
    with pytest.raises(DataError, match=bad["name"]):  # the driver's up-front check
        check_shards(d, "train")
    assert ranks[0].num_samples == meta["counts"]["train"] - bad["samples"]
    parts = [_keys(_epoch(r)) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == ranks[0].batches_per_epoch
    # nothing of the skipped shard is trained on; everything else is (up to the partial batch)
    with tarfile.open(tiny_shards / bad["name"]) as t:
        bad_keys = {m.name.removesuffix(".json") for m in t.getmembers()}
    read = {k for p in parts for b in p for k in b}
    assert len(bad_keys) == bad["samples"] and not read & bad_keys
    assert len(read) > ranks[0].num_samples - 2 * BS


def test_edited_shard_is_named_when_a_rank_reads_it(tiny_shards, tmp_path):
    """Same size, other bytes: the quick check at start passes, the reader's sha256 check does not."""
    d, meta = _copy(tiny_shards, tmp_path)
    bad = meta["shards"]["train"][2]
    data = bytearray((d / bad["name"]).read_bytes())
    data[600] ^= 0xFF
    (d / bad["name"]).write_bytes(bytes(data))
    assert len(check_shards(d, "train")[0]) == len(meta["shards"]["train"])  # the quick check: a listing
    with pytest.raises(DataError, match=f"{bad['name']}: corrupt shard: sha256"):
        check_shards(d, "train", hashes=True)  # the full check hashes every shard
    s = _stream(d)
    assert s.bytes_read == 0  # construction lists the directory, it reads no shard
    with pytest.raises(DataError, match=f"{bad['name']}: corrupt shard: sha256"):
        _epoch(s)


def test_out_of_range_item_in_train_shard(tiny_shards, tmp_path):
    d, meta = _copy(tiny_shards, tmp_path)
    samples = [{"key": f"u0-t{i}", "user": 0, "history": [1, 2, 3], "target": 4} for i in range(40)]
    samples[3]["history"] = [1, meta["n_items"] + 7, 3]
    data = tar_bytes(samples)
    for e in meta["shards"]["train"]:
        (d / e["name"]).unlink()
    (d / "train-000000.tar").write_bytes(data)
    meta["shards"]["train"] = [{"name": "train-000000.tar", "sha256": hashlib.sha256(data).hexdigest(), "samples": 40}]
    meta["counts"]["train"] = 40
    (d / "meta.json").write_text(json.dumps(meta))
    s = _stream(d, shuffle_buffer=1)
    with pytest.raises(DataError, match=r"train-000000.tar: sample 'u0-t3': history: item id \d+ out of range"):
        list(islice(iter(s), 5))


def test_too_few_samples_for_one_global_batch(tiny_shards):
    with pytest.raises(DataError, match="fewer than one global batch"):
        _stream(tiny_shards, 0, 2, batch_size=10 ** 6)
