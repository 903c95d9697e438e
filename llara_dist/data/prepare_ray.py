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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llara_dist.config import PrepareConfig
from llara_dist.data.prepare import (SPLITS, ShardSpec, check_candidates, check_test_samples, clean_stale,
                                     finish, load_source, write_bytes, write_shard)
from llara_dist.data.samples import UserChunk, chunk_samples, record_dtype
from llara_dist.data.shards import COMPRESSIONS
from llara_dist.data.sources import (_PARTITION_ROWS, SpilledLog, Tabular, _sorted_raw_ids, first_rows,
                                     unknown_item_error)
from llara_dist.errors import DataError

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


def _columns(chunk: UserChunk, p: PrepareConfig) -> dict[str, np.ndarray]:
    """A chunk of users -> its samples as columns, plus one statistics row."""
    cs = chunk_samples(chunk, history_len=p.history_len, min_history=p.min_history, dedup=p.dedup, seed=p.seed)
    parts = [cs.records[s] for s in SPLITS]
    rec = np.concatenate(parts + [np.zeros(1, dtype=parts[0].dtype)])
    split = np.repeat(np.arange(len(SPLITS) + 1, dtype=np.int8), [len(x) for x in parts] + [1])
    # the stats row: dropped samples/users and removed repeats, in the user/pos/target fields
    rec[-1]["user"], rec[-1]["pos"] = cs.dropped["short_history_samples"], cs.dropped["users_without_test_sample"]
    rec[-1]["target"] = cs.removed_repeats
    return {"split": split, "order": (rec["key"] ^ _SIGN).view(np.int64), "user": rec["user"],
            "pos": rec["pos"], "target": rec["target"], "hist": rec["hist"]}


def _sample_columns(chunker, p: PrepareConfig):
    """The map of pass 2 after a driver read: one partition (an object ref) -> its sample columns."""
    import ray

    def build(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _columns(chunker(ray.get(batch["piece"][0])), p)

    return build


# ----------------------------------------------------------------------------------------------
# Parquet/CSV: the read itself in Ray Data tasks, one per input file

_ROW_BITS = 40  # row key = file index << 40 | row in the file: the input order as one sortable int64


@dataclass
class _ReadLog:
    """What `finish` needs of a log read by the tasks (the local engine's log has the same fields)."""

    source: str
    domain: str
    titles: list[str]
    n_users: int
    filtered: dict[str, int]


def _read_file(tab: Tabular):
    """Read task: one file -> rows (user, item, time, row key) and, on each item's first row of a
    batch, its normalised title ("" for none; null on the other rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def read(batch: dict[str, np.ndarray]):
        k = int(batch["file"][0])
        for base, users, items, times, titles in tab.batches(k):
            codes = pc.dictionary_encode(items).indices.to_numpy(zero_copy_only=False)
            first, names = first_rows(codes, titles)
            title = np.full(len(times), None, dtype=object)
            title[first] = names
            rows = (k << _ROW_BITS) + base + np.arange(len(times), dtype=np.int64)
            yield pa.table({"user": users, "item": items, "time": times, "row": rows,
                            "title": pa.array(title, pa.string())})

    return read


def _group_users(p: PrepareConfig):
    """Pass 2 after a distributed read: the rows of a group of users -> their sample columns."""

    def build(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        order = np.lexsort((rows["row"], rows["time"], rows["user"]))  # by user, time, input order
        return _columns(UserChunk.from_sorted(rows["user"][order], rows["item"][order]), p)

    return build


def _read_tabular(p: PrepareConfig, tab: Tabular):
    """The distributed read and grouping of a Parquet/CSV log: (the log's summary, sample columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data

    # hash partitions of the two group-bys: a few per CPU (Ray Data's default of 200 is for big clusters)
    parts = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    rows = (ray.data.from_items([{"file": k} for k in range(len(tab.files))], override_num_blocks=len(tab.files))
            .map_batches(_read_file(tab), batch_size=1, batch_format="numpy").materialize())
    # Items: each one's first row in input order names it (and makes it unknown when untitled).
    firsts = (rows.map_batches(lambda t: t.filter(pc.is_valid(t["title"])).select(["item", "row", "title"]),
                               batch_format="pyarrow")
              .groupby("item", num_partitions=parts).map_groups(
                  lambda g: {k: v[[int(np.argmin(g["row"]))]] for k, v in g.items()}, batch_format="numpy")
              .take_all())
    unknown = [f for f in firsts if not f["title"]]
    if unknown and not p.drop_unknown:
        f = min(unknown, key=lambda f: int(f["row"]))
        row = int(f["row"])
        raise unknown_item_error(tab.where(row >> _ROW_BITS, row & ((1 << _ROW_BITS) - 1)), str(f["item"]),
                                 tab.missing_title)
    known = {str(f["item"]): str(f["title"]) for f in firsts if f["title"]}
    item_ids = _sorted_raw_ids(known)
    item_set = pa.array(item_ids, pa.string())

    def dense_items(t: pa.Table) -> pa.Table:
        idx = pc.index_in(t["item"], value_set=item_set)
        keep = pc.is_valid(idx)
        return pa.table({"user": t["user"], "item": idx, "time": t["time"], "row": t["row"]}).filter(keep)

    kept = rows.map_batches(dense_items, batch_format="pyarrow").materialize()
    n_kept = kept.count()
    if not n_kept:
        raise DataError(f"{tab.path}: no interactions")
    user_ids = _sorted_raw_ids(str(u) for u in kept.unique("user"))
    user_set = pa.array(user_ids, pa.string())
    users_per_part = -(-len(user_ids) // max(1, n_kept // _PARTITION_ROWS))

    def dense_users(t: pa.Table) -> pa.Table:
        user = pc.index_in(t["user"], value_set=user_set)
        return t.set_column(0, "user", user).append_column(
            "part", pc.divide(user, pa.scalar(users_per_part, user.type)))

    samples = (kept.map_batches(dense_users, batch_format="pyarrow")
               .groupby("part", num_partitions=parts).map_groups(_group_users(p), batch_format="numpy"))
    log = _ReadLog(tab.source, p.domain or "movie", [known[i] for i in item_ids], len(user_ids),
                   {"unknown_item_interactions": rows.count() - n_kept})
    return log, samples


def _records(batch: dict[str, np.ndarray], history_len: int) -> np.ndarray:
    rec = np.empty(len(batch["user"]), dtype=record_dtype(history_len))
    rec["key"] = np.asarray(batch["order"], dtype=np.int64).view(np.uint64) ^ _SIGN
    for k in ("user", "pos", "target"):
        rec[k] = batch[k]
    rec["hist"] = np.asarray(batch["hist"]).reshape(len(rec), history_len)
    return rec


def prepare_ray(p: PrepareConfig) -> dict:
    """The Ray engine of `run_prepare`; returns the meta (identical to the local engine's)."""
    _ensure_ray()
    try:
        return _prepare_ray(p)
    except Exception as e:  # a bad input row, raised in a task: the same one-line DataError as locally
        cause = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if cause is None:
            raise
        raise DataError(str(cause)) from None


def _prepare_ray(p: PrepareConfig) -> dict:
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if p.format in ("parquet", "csv"):
        if not p.input:
            raise DataError(f"prepare.input: --format {p.format} needs --input PATH")
        tab = Tabular.of(p.input, p.format, user_field=p.user_field, item_field=p.item_field,
                         time_field=p.time_field, title_field=p.title_field)
        data, samples_ds = _read_tabular(p, tab)
        check_candidates(p, len(data.titles))
    else:  # RecBole/GroupLens (one file) and synthetic: read on the driver, partitions to the store
        with tempfile.TemporaryDirectory(prefix="llara-prepare-", dir=p.tmp_dir) as tmp:
            data = load_source(p, Path(tmp))
            # Pass 2's tasks need the id maps (per user/item), never the titles or the driver's files.
            chunker = (dataclasses.replace(data, titles=[]).piece_chunk if isinstance(data, SpilledLog)
                       else type(data).piece_chunk)
            pieces = [ray.put(piece) for piece in data.pieces()]  # partition by partition
        check_candidates(p, len(data.titles))
        samples_ds = (ray.data.from_items([{"piece": ref} for ref in pieces], override_num_blocks=len(pieces))
                      .map_batches(_sample_columns(chunker, p), batch_size=1, batch_format="numpy"))
    samples_ds = samples_ds.materialize()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

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
    write_task = ray.remote(num_cpus=1)(_write_on_node)
    # Shards go round-robin over the nodes with CPUs (soft affinity: a node that goes away is
    # replaced): "SPREAD" is only a preference, and with fast tasks it kept them all on one node.
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    placement = [NodeAffinitySchedulingStrategy(node, soft=True) for node in nodes] or ["DEFAULT"]
    results, pending = [], deque()
    for split in SPLITS:
        batches = ordered.pop(split).iter_batches(batch_size=p.samples_per_shard, batch_format="numpy")
        for k, batch in enumerate(batches):
            strategy = placement[(len(results) + len(pending)) % len(placement)]
            pending.append(write_task.options(scheduling_strategy=strategy).remote(
                spec, out, split, k, _records(batch, p.history_len)))
            if len(pending) >= 2 * cpus:
                results.append(ray.get(pending.popleft()))
    results += ray.get(list(pending))
    nodes = {node for _, _, node in results}
    print(f"ray engine: {len(results)} shards written by tasks on {len(nodes)} node(s)")
    return finish(data, p, dropped, removed, [(entry, st) for entry, st, _ in results],
                  lambda name, b: write_bytes(out, name, b))


def _write_on_node(spec: ShardSpec, out: str, split: str, index: int, records: np.ndarray):
    import ray

    entry, stats = write_shard(spec, out, split, index, records)
    return entry, stats, ray.get_runtime_context().get_node_id()
