"""`llara-dist prepare --engine ray`: the out-of-core prepare as a Ray Data pipeline across a cluster.

The same three passes as the local engine (`prepare`'s docstring), the same pure functions:

1. **Read** on the driver: Arrow streams the log once into partitions by user (bounded memory);
   each partition's rows go to the object store as they are read back.
2. **Group by user -> samples** in Ray Data tasks (`map_batches`, one partition per call): sort
   the partition into users' sequences and build every sample record (`samples.chunk_samples`).
3. **Order** with Ray Data's distributed `sort` (train by the seeded per-sample key, valid/test by
   user), then **shard writing** in Ray tasks spread over the nodes: the driver cuts the sorted
   stream into shards of `samples_per_shard` (records only: ~60 bytes a sample) and each task
   encodes, hashes and writes one shard.

Every byte is the local engine's, whatever the cluster (a test compares on two nodes). The output
is a local path every node sees (shared storage) or a ``pyarrow.fs`` URI (``s3://bucket/prefix``,
``gs://...``, ``file:///...``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from llara_dist.config import PrepareConfig
from llara_dist.data.prepare import (SPLITS, Samples, ShardSpec, check_candidates, check_test_samples, clean_stale,
                                     finish, load_source, write_bytes, write_shard)
from llara_dist.data.samples import chunk_samples, record_dtype
from llara_dist.data.shards import COMPRESSIONS
from llara_dist.data.sources import SpilledLog

_SIGN = np.uint64(1 << 63)  # key ^ _SIGN viewed as int64 sorts like the uint64 key (Arrow sorts int64)
_STATS = len(SPLITS)  # split code of the one statistics row each partition emits


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    return ray


def _prepare_out(out: str) -> None:
    if "://" in out:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(out)
        fs.create_dir(root, recursive=True)
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.base_name
            if name.split("-")[0] in SPLITS and name.endswith(tuple(COMPRESSIONS.values())):
                fs.delete_file(info.path)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        clean_stale(Path(out))


def _sample_columns(chunker, p: PrepareConfig):
    """The map of pass 2: one partition (an object ref) -> its samples as columns, plus a stats row."""
    import ray

    def build(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cs = chunk_samples(chunker(ray.get(batch["piece"][0])), history_len=p.history_len,
                           min_history=p.min_history, dedup=p.dedup, seed=p.seed)
        parts = [cs.records[s] for s in SPLITS]
        rec = np.concatenate(parts + [np.zeros(1, dtype=parts[0].dtype)])
        split = np.repeat(np.arange(len(SPLITS) + 1, dtype=np.int8), [len(x) for x in parts] + [1])
        # the stats row: dropped samples/users and removed repeats, in the user/pos/target fields
        rec[-1]["user"], rec[-1]["pos"] = cs.dropped["short_history_samples"], cs.dropped["users_without_test_sample"]
        rec[-1]["target"] = cs.removed_repeats
        return {"split": split, "order": (rec["key"] ^ _SIGN).view(np.int64), "user": rec["user"],
                "pos": rec["pos"], "target": rec["target"], "hist": rec["hist"]}

    return build


def _records(batch: dict[str, np.ndarray], history_len: int) -> np.ndarray:
    rec = np.empty(len(batch["user"]), dtype=record_dtype(history_len))
    rec["key"] = np.asarray(batch["order"], dtype=np.int64).view(np.uint64) ^ _SIGN
    for k in ("user", "pos", "target"):
        rec[k] = batch[k]
    rec["hist"] = np.asarray(batch["hist"]).reshape(len(rec), history_len)
    return rec


def prepare_ray(p: PrepareConfig) -> dict:
    """The Ray engine of `run_prepare`; returns the meta (identical to the local engine's)."""
    ray = _ensure_ray()
    import ray.data

    with tempfile.TemporaryDirectory(prefix="llara-prepare-", dir=p.tmp_dir) as tmp:
        data = load_source(p, Path(tmp))
        # Pass 2's tasks need the id maps (per user/item), never the titles or the driver's files.
        chunker = (dataclasses.replace(data, titles=[]).piece_chunk if isinstance(data, SpilledLog)
                   else type(data).piece_chunk)
        pieces = [ray.put(piece) for piece in data.pieces()]  # partition by partition, into the store
    check_candidates(p, len(data.titles))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    samples_ds = (ray.data.from_items([{"piece": ref} for ref in pieces], override_num_blocks=len(pieces))
                  .map_batches(_sample_columns(chunker, p), batch_size=1, batch_format="numpy")
                  .materialize())
    del pieces

    def only(code: int):
        return lambda b: {k: v[b["split"] == code] for k, v in b.items()}

    stats = samples_ds.map_batches(only(_STATS), batch_format="numpy").take_all()
    dropped = {"short_history_samples": sum(int(r["user"]) for r in stats),
               "users_without_test_sample": sum(int(r["pos"]) for r in stats)}
    removed = sum(int(r["target"]) for r in stats)
    # Each split sorted once and materialised: its count is then free, and the shards stream from it.
    ordered = {split: samples_ds.map_batches(only(i), batch_format="numpy")
               .sort(["order", "user", "pos"] if split == "train" else ["user"]).materialize()
               for i, split in enumerate(SPLITS)}
    del samples_ds
    check_test_samples(p, ordered["test"].count())

    out = p.out
    _prepare_out(out)
    spec = ShardSpec.of(p, len(data.titles))
    write_task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_write_on_node)
    results, pending = [], deque()
    for split in SPLITS:
        batches = ordered.pop(split).iter_batches(batch_size=p.samples_per_shard, batch_format="numpy")
        for k, batch in enumerate(batches):
            pending.append(write_task.remote(spec, out, split, k, _records(batch, p.history_len)))
            if len(pending) >= 2 * cpus:
                results.append(ray.get(pending.popleft()))
    results += ray.get(list(pending))
    nodes = {node for _, _, node in results}
    print(f"ray engine: {len(results)} shards written by tasks on {len(nodes)} node(s)")
    samples = Samples(spills={}, dropped=dropped, removed_repeats=removed)
    return finish(data, p, samples, [(entry, st) for entry, st, _ in results], lambda name, b: write_bytes(out, name, b))


def _write_on_node(spec: ShardSpec, out: str, split: str, index: int, records: np.ndarray):
    import ray

    entry, stats = write_shard(spec, out, split, index, records)
    return entry, stats, ray.get_runtime_context().get_node_id()
