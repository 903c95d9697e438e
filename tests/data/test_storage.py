"""Shards read through a non-local pyarrow filesystem and as gzip-compressed tars, by the real readers."""

from __future__ import annotations

import gzip
import hashlib
import json
from itertools import islice

import pyarrow.fs as pafs
import pytest

from llara_dist.data.shards import load_meta, load_titles, read_split
from llara_dist.data.storage import ShardDir
from llara_dist.data.stream import TrainStream
from llara_dist.errors import DataError

fsspec = pytest.importorskip("fsspec")


def _global_keys(shard_dir, world: int, batches: int) -> list[list[list[str]]]:
    ranks = [TrainStream(shard_dir, batch_size=4, rank=r, world_size=world, seed=3, shuffle_buffer=100,
                         num_candidates=20) for r in range(world)]
    return [[[s["key"] for s in b] for b in islice(iter(x), batches)] for x in ranks], ranks


@pytest.fixture(scope="module")
def memory_shards(tiny_shards):
    """The tiny shards copied into an fsspec in-memory filesystem behind pyarrow's PyFileSystem,
    with every other train shard stored as ``.tar.gz`` (meta.json updated as prepare would)."""
    mem = fsspec.filesystem("memory")
    root = "/bucket/llara-stream-test"
    if mem.exists(root):
        mem.rm(root, recursive=True)
    meta = json.loads((tiny_shards / "meta.json").read_text())
    for split, entries in meta["shards"].items():
        for i, e in enumerate(entries):
            data = (tiny_shards / e["name"]).read_bytes()
            if split == "train" and i % 2:
                data = gzip.compress(data, mtime=0)
                e["name"], e["sha256"] = e["name"] + ".gz", hashlib.sha256(data).hexdigest()
            mem.pipe(f"{root}/{e['name']}", data)
    mem.pipe(f"{root}/meta.json", json.dumps(meta).encode())
    mem.pipe(f"{root}/items.jsonl", (tiny_shards / "items.jsonl").read_bytes())
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(mem))
    yield ShardDir.on(fs, root), meta
    mem.rm(root, recursive=True)


def test_stream_reads_gz_shards_through_a_non_local_filesystem(tiny_shards, memory_shards):
    loc, meta = memory_shards
    assert not isinstance(loc.fs, pafs.LocalFileSystem)
    assert any(e["name"].endswith(".tar.gz") for e in meta["shards"]["train"])
    assert load_meta(loc)["shards"] == meta["shards"] and load_titles(loc) == load_titles(tiny_shards)
    assert list(read_split(loc, "train")) == list(read_split(tiny_shards, "train"))
    remote, ranks = _global_keys(loc, 2, 20)
    local, _ = _global_keys(tiny_shards, 2, 20)
    assert remote == local  # same order, whatever the storage and the compression
    stored = {e["name"]: e for e in meta["shards"]["train"]}
    assert all(0 < r.bytes_read for r in ranks)
    # bytes_read counts stored (compressed) bytes: at most every train shard as stored
    assert sum(r.bytes_read for r in ranks) <= 2 * sum(len(loc.read(n)) for n in stored)


def test_damage_on_a_non_local_filesystem_is_named(memory_shards):
    loc, meta = memory_shards
    gz = next(e for e in meta["shards"]["train"] if e["name"].endswith(".gz"))
    good = loc.read(gz["name"])
    mem = loc.fs.handler.fs
    try:
        mem.pipe(f"{loc.path}/{gz['name']}", good[:-20])  # truncated .tar.gz: caught by the sha256 on read
        s = TrainStream(loc, batch_size=4, rank=0, world_size=1, seed=3, shuffle_buffer=100, num_candidates=20)
        with pytest.raises(DataError, match=rf"{gz['name']}: corrupt shard: sha256"):
            list(islice(iter(s), s.batches_per_epoch))
        mem.rm(f"{loc.path}/{gz['name']}")
        with pytest.raises(DataError, match=rf"{gz['name']}: shard listed in meta.json is missing"):
            TrainStream(loc, batch_size=4, rank=0, world_size=1, seed=3, shuffle_buffer=100, num_candidates=20)
    finally:
        mem.pipe(f"{loc.path}/{gz['name']}", good)


def test_uris(tiny_shards):
    """A file:// URI goes through pyarrow's URI resolution; an unknown scheme is one clear line."""
    uri = tiny_shards.resolve().as_uri()
    assert ShardDir.of(uri).label == uri
    a, _ = _global_keys(uri, 1, 3)
    b, _ = _global_keys(tiny_shards, 1, 3)
    assert a == b
    with pytest.raises(DataError, match="nosuch://bucket/x: not a path or a filesystem URI"):
        load_meta("nosuch://bucket/x")
    with pytest.raises(DataError, match="meta.json: not found"):
        load_meta(uri + "/missing")
