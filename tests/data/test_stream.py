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
from llara_dist.data.stream import TrainStream
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


def test_uneven_shards_give_equal_disjoint_rank_parts(tiny_shards, single):
    meta = load_meta(tiny_shards)
    sizes = [e["samples"] for e in meta["shards"]["train"]]
    assert len(set(sizes)) > 1  # the last shard is short: an uneven layout
    s1, ref = single
    n = meta["counts"]["train"]
    assert s1.batches_per_epoch == n // BS
    flat = [k for b in _keys(ref[: s1.batches_per_epoch]) for k in b]
    assert len(flat) == len(set(flat))  # an epoch has no repeats
    for ws in (2, 3):
        ranks = [_stream(tiny_shards, r, ws) for r in range(ws)]
        assert {r.batches_per_epoch for r in ranks} == {n // (ws * BS)}
        parts = [_keys(_epoch(r)) for r in ranks]
        assert all(len(p) == n // (ws * BS) for p in parts)
        seen = [k for p in parts for b in p for k in b]
        assert len(seen) == len(set(seen))  # disjoint
        # global batch i is the ranks' batches side by side, in the world-size-independent order
        glob = [k for i in range(len(parts[0])) for r in range(ws) for k in parts[r][i]]
        assert glob == flat[: len(glob)]


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
    # a shuffle buffer of 1 keeps each shard's stored order
    no_shuffle = _stream(tiny_shards, shuffle_buffer=1)
    first = _keys(islice(iter(no_shuffle), 1))[0]
    names = [e["name"] for e in load_meta(tiny_shards)["shards"]["train"]]
    stored = {s["key"]: i for i, s in enumerate(read_split(tiny_shards, "train"))}
    pos = [stored[k] for k in first]
    assert pos == list(range(pos[0], pos[0] + BS)) and len(names) > 1


def test_exact_resume_same_and_other_world_size(tiny_shards, single):
    s1, ref = single
    flat = [s for b in ref for s in b]
    # world size 2 trains 5 batches, checkpoints, and is resumed at world size 2 and at 3
    a = [_stream(tiny_shards, r, 2) for r in range(2)]
    its = [iter(x) for x in a]
    for _ in range(5):
        for it in its:
            next(it)
    state = a[0].state_dict()
    assert state == a[1].state_dict() == {"epoch": 0, "offset": 5 * 2 * BS}
    cont = [next(it) for it in its]  # the uninterrupted run's next step
    resumed = [_stream(tiny_shards, r, 2) for r in range(2)]
    for x in resumed:
        x.load_state_dict(state)
    assert [next(iter(x)) for x in resumed] == cont  # same samples, same candidates
    # re-split for 3 ranks: the rest of the epoch, in the same global order, nothing repeated
    three = [_stream(tiny_shards, r, 3) for r in range(3)]
    for x in three:
        x.load_state_dict(state)
    left = (s1.num_samples - state["offset"]) // (3 * BS)
    parts = [list(islice(iter(x), left)) for x in three]
    glob = [s for i in range(left) for r in range(3) for s in parts[r][i]]
    assert glob == flat[state["offset"]: state["offset"] + len(glob)]
    assert all(x.state_dict() == {"epoch": 1, "offset": 0} for x in three)  # epoch finished
    # the next epoch at world size 3 starts the epoch-1 global order
    e1 = [s["key"] for b in ref[s1.batches_per_epoch:] for s in b]
    fresh = [_stream(tiny_shards, r, 3) for r in range(3)]
    for x in fresh:
        x.load_state_dict({"epoch": 1, "offset": 0})
    assert [s["key"] for r in range(3) for s in next(iter(fresh[r]))] == e1[: 3 * BS]


def test_state_after_matches_iteration_and_bad_state(tiny_shards):
    s = _stream(tiny_shards, 0, 2)
    it = iter(s)
    for _ in range(s.batches_per_epoch + 3):
        next(it)
    assert s.state_dict() == _stream(tiny_shards, 0, 2).state_after(s.batches_per_epoch + 3)
    assert s.state_dict()["epoch"] == 1
    with pytest.raises(DataError, match="stream state"):
        s.load_state_dict({"epoch": 0, "offset": 10 ** 9})


def test_dataloader_workers_keep_the_split_exact(tiny_shards):
    s = _stream(tiny_shards, 1, 2)
    want = _keys(islice(iter(_stream(tiny_shards, 1, 2)), 7))
    loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2, collate_fn=lambda b: b)
    got = _keys(islice(iter(loader), 7))
    assert got == want


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
