"""`llara-dist prepare`: raw interactions -> seeded samples -> WebDataset shards + meta.json.

Out of core, in three passes, so memory does not grow with the log (only the per-user and per-item
arrays do):

1. **Read** (`sources`): Arrow reads the log in batches; rows are spilled to disk partitioned by
   user as compact (user, item, time) records.
2. **Samples**: one partition at a time is sorted into users' sequences, and every sample is built
   vectorised as a fixed-size record (`samples.record_dtype`: user, target position, target,
   history). Train records are spilled to buckets by the top bits of a seeded per-sample shuffle
   key (`samples.shuffle_keys`), valid/test records to buckets by user range.
3. **Shards**: bucket by bucket, records are sorted (train: by key; valid/test: by user) and cut
   into shards of `samples_per_shard`, which are encoded, hashed and written, by
   `prepare.workers` forked processes.

Every stored byte is a pure function of (the log, the settings, the seed): the order is a sort by
per-sample keys, valid/test candidates come from a per-sample RNG keyed by the sample key, so the
output is the same for any number of partitions, buckets, processes or Ray tasks (`--engine ray`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from llara_dist.config import Config, PrepareConfig
from llara_dist.data.samples import SPLITS, chunk_samples, eval_candidates, record_dtype
from llara_dist.data.shards import (COMPRESSIONS, SCHEMA_VERSION, compress_shard, sha256_bytes, shard_name, tar_members,
                                    tar_columns)
from llara_dist.data.sources import (Interactions, SpilledLog, generate_synthetic, load_grouplens, load_recbole,
                                     load_tabular)
from llara_dist.data.spill import Spill, power_of_two_at_least, top_bits_bucket
from llara_dist.errors import DataError

# Settings added after schema 1 enter the fingerprint only when they differ from these defaults,
# so a default prepare keeps the fingerprint (and the shards) it had before they existed.
_NEW_SETTING_DEFAULTS = {"dedup": "none", "negatives": "unseen", "compression": "none"}
# Bucket sizes of the sample spills: a bucket is sorted in memory (~60 bytes per record).
_TRAIN_BUCKET_RECORDS = 1 << 19
_EVAL_BUCKET_USERS = 1 << 18

Log = Interactions | SpilledLog


def load_source(p: PrepareConfig, tmp: Path) -> Log:
    """The log of `p.format`: in memory (synthetic) or spilled to partitions under `tmp`."""
    if p.format == "synthetic":
        return generate_synthetic(p.users, p.items, p.seed)
    if not p.input:
        raise DataError(f"prepare.input: --format {p.format} needs --input PATH")
    if p.format == "recbole":
        return load_recbole(p.input, tmp, drop_unknown=p.drop_unknown, item_field=p.item_field,
                            title_field=p.title_field, user_field=p.user_field, time_field=p.time_field)
    if p.format in ("parquet", "csv"):
        return load_tabular(p.input, p.format, tmp, drop_unknown=p.drop_unknown, user_field=p.user_field,
                            item_field=p.item_field, time_field=p.time_field, title_field=p.title_field,
                            domain=p.domain or "movie")
    return load_grouplens(p.input, tmp, drop_unknown=p.drop_unknown)


def _items_jsonl(titles: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in enumerate(titles)).encode()


def _fingerprint(items: bytes, shards: dict, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(items).digest())
    h.update(json.dumps({"shards": shards, "settings": settings}, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Pass 2: every sample as a record, spilled to sort buckets


@dataclass
class Samples:
    """The samples of a prepare, spilled and ready to be written in order."""

    spills: dict[str, Spill]
    dropped: dict[str, int]
    removed_repeats: int

    @property
    def counts(self) -> dict[str, int]:
        return {s: int(self.spills[s].counts.sum()) for s in SPLITS}


def spill_samples(data: Log, p: PrepareConfig, tmp: Path) -> Samples:
    """Build every sample of `data` chunk by chunk and spill it to its sort bucket under `tmp`."""
    check_candidates(p, len(data.titles))
    dtype = record_dtype(p.history_len)
    train_buckets = power_of_two_at_least(data.n_interactions / _TRAIN_BUCKET_RECORDS)
    eval_buckets = data.n_users // _EVAL_BUCKET_USERS + 1
    spills = {"train": Spill(tmp, "train", dtype, train_buckets), "valid": Spill(tmp, "valid", dtype, eval_buckets),
              "test": Spill(tmp, "test", dtype, eval_buckets)}
    dropped = {"short_history_samples": 0, "users_without_test_sample": 0}
    removed = 0
    pieces = data.spill.buckets if isinstance(data, SpilledLog) else None
    for chunk in tqdm(data.chunks(), total=pieces, desc="building samples", unit="partition", leave=False,
                      disable=None):
        cs = chunk_samples(chunk, history_len=p.history_len, min_history=p.min_history, dedup=p.dedup, seed=p.seed)
        train = cs.records["train"]
        spills["train"].append(top_bits_bucket(train["key"], train_buckets), train)
        for split in ("valid", "test"):
            rec = cs.records[split]
            spills[split].append(rec["user"] // _EVAL_BUCKET_USERS, rec)
        for k, v in cs.dropped.items():
            dropped[k] += v
        removed += cs.removed_repeats
    samples = Samples(spills, dropped, removed)
    check_test_samples(p, samples.counts["test"])
    return samples


def check_candidates(p: PrepareConfig, n_items: int) -> None:
    need = p.num_candidates - 1
    if p.negatives == "any" and n_items - 1 < need:
        raise DataError(f"num_candidates={p.num_candidates} needs {need} negatives but only "
                        f"{n_items - 1} items are not the target")


def check_test_samples(p: PrepareConfig, n_test: int) -> None:
    if not n_test:
        raise DataError(f"prepare: no user has more than min_history={p.min_history} interactions; "
                        "nothing to train or evaluate on")


def ordered_shards(spill: Spill, split: str, samples_per_shard: int) -> Iterator[np.ndarray]:
    """A split's records in stored order, cut into shards: one bucket in memory at a time.

    Train is sorted by shuffle key (ties by user, position: a total order), valid/test by user;
    since buckets hold increasing key (user) ranges, the concatenation is the global order.
    """
    S = samples_per_shard
    carry = np.zeros(0, dtype=spill.dtype)
    for b in range(spill.buckets):
        rec = spill.read(b)
        spill.drop(b)
        if split == "train":
            rec = rec[np.lexsort((rec["pos"], rec["user"], rec["key"]))]
        else:
            rec = rec[np.argsort(rec["user"], kind="stable")]
        if len(carry):
            rec = np.concatenate([carry, rec])
        full = len(rec) // S * S
        for a in range(0, full, S):
            yield rec[a:a + S]
        carry = rec[full:]
    if len(carry):
        yield carry


# ----------------------------------------------------------------------------------------------
# Pass 3: one shard, a pure function of its records


@dataclass(frozen=True)
class ShardSpec:
    """What every shard writer shares (small: it travels with each task)."""

    n_items: int
    history_len: int
    num_candidates: int
    seed: int
    negatives: str
    compression: str

    @classmethod
    def of(cls, p: PrepareConfig, n_items: int) -> "ShardSpec":
        return cls(n_items=n_items, history_len=p.history_len, num_candidates=p.num_candidates, seed=p.seed,
                   negatives=p.negatives, compression=p.compression)


def _train_tar(records: np.ndarray, lens: np.ndarray, H: int) -> bytes:
    """The tar of train samples (no candidates), built column-wise: the same bytes as the per-sample
    loop (`_members_per_sample` + `tar_members`; tests check) at ~3x its speed (benchmarks/
    bench_encode.py). Train is nearly all of a dataset, so this was most of `prepare`'s CPU.

    Arrow's kernels format the ints (as `str` does) and join the pieces of every JSON body at once;
    `tar_columns` then lays out the members. A history is the last `lens[i]` entries of its row.
    """
    import pyarrow.compute as pc

    def text(values: np.ndarray):
        return pc.cast(pa.array(values), pa.string())

    user, pos = text(records["user"]), text(records["pos"])
    hist = records["hist"]
    kept = hist[np.arange(H)[None, :] >= (H - lens)[:, None]]  # row-major: each history in order
    offsets = np.zeros(len(records) + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    history = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), text(kept)), ",")
    key = pc.binary_join_element_wise("u", user, "-t", pos, "")
    body = pc.binary_join_element_wise('{"key":"', key, '","user":', user, ',"history":[', history,
                                       '],"target":', text(records["target"]), "}", "")
    name = pc.binary_join_element_wise(key, ".json", "")
    return tar_columns(name, body)


def shard_file(spec: ShardSpec, split: str, records: np.ndarray) -> tuple[bytes, dict[str, int]]:
    """(file bytes, repeat statistics) of one shard holding `records` in order.

    The JSON is exactly ``json.dumps(sample, separators=(",", ":"))`` of ``{"key", "user", "history",
    "target"[, "candidates"]}`` (a test checks against that). Train shards are built column-wise
    (`_train_tar`); valid/test draw their candidates per sample, so they are formatted by hand here.
    """
    H = spec.history_len
    hist, target_ids = records["hist"], records["target"]
    lens = (hist >= 0).sum(axis=1)  # histories are left-padded with -1
    in_history = (hist == target_ids[:, None]).any(axis=1)
    stats = {"target_in_history": int(in_history.sum()), "shortcut": 0}
    if split == "train":
        return compress_shard(_train_tar(records, lens, H), spec.compression), stats
    members = _members_per_sample(spec, split, records, lens, in_history, stats)
    return compress_shard(tar_members(members), spec.compression), stats


def _members_per_sample(spec: ShardSpec, split: str, records: np.ndarray, lens: np.ndarray,
                        in_history: np.ndarray, stats: dict[str, int]) -> list[tuple[str, bytes]]:
    """`tar_members` input, one sample at a time, counting shortcuts into `stats` (valid/test; for
    train it is the reference `_train_tar` is tested against)."""
    H = spec.history_len
    hist, target_ids = records["hist"], records["target"]
    members = []
    with_candidates = split != "train"
    for u, pos, t, h, n, rep in zip(records["user"].tolist(), records["pos"].tolist(), target_ids.tolist(),
                                    hist.tolist(), lens.tolist(), in_history.tolist()):
        key = f"u{u}-t{pos}"
        history = h[H - n:]
        body = f'{{"key":"{key}","user":{u},"history":[{",".join(map(str, history))}],"target":{t}'
        if with_candidates:
            cands = eval_candidates({"key": key, "target": t, "history": history}, spec.n_items,
                                    spec.num_candidates, spec.seed, spec.negatives)
            body += f',"candidates":[{",".join(map(str, cands))}]}}'
            # the shortcut: the target is in the history and no other candidate is
            if rep and not set(history).intersection(c for c in cands if c != t):
                stats["shortcut"] += 1
        else:
            body += "}"
        members.append((key + ".json", body.encode()))
    return members


def write_shard(spec: ShardSpec, out: str, split: str, index: int, records: np.ndarray) -> tuple[dict, dict]:
    """Write one shard under `out` (a local path or a pyarrow.fs URI); (meta entry, stats)."""
    data, stats = shard_file(spec, split, records)
    name = shard_name(split, index, spec.compression)
    write_bytes(out, name, data)
    return {"name": name, "sha256": sha256_bytes(data), "samples": int(len(records))}, stats


def write_bytes(out: str, name: str, data: bytes) -> None:
    if "://" in out:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(out)
        # compression=None: Arrow would otherwise gzip a ".gz" name a second time
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}", compression=None) as f:
            f.write(data)
    else:
        Path(out, name).write_bytes(data)


def clean_stale(out: Path) -> None:
    """Never leave shards of an earlier prepare next to the new ones."""
    for suffix in COMPRESSIONS.values():
        for stale in out.glob(f"*{suffix}"):
            if stale.name.split("-")[0] in SPLITS:
                stale.unlink()


def shard_tasks(samples: Samples, samples_per_shard: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """(split, shard index, records) of every shard, in meta.json's order."""
    for split in SPLITS:
        for k, records in enumerate(ordered_shards(samples.spills[split], split, samples_per_shard)):
            yield split, k, records


def write_local(samples: Samples, spec: ShardSpec, out: Path, samples_per_shard: int, pool, workers: int,
                progress: bool) -> list[tuple[dict, dict]]:
    """Write every shard in order; with a pool, a bounded number of shards in flight (memory stays
    a few shards per worker, whatever the data size)."""
    results: list[tuple[dict, dict]] = []
    with tqdm(total=sum(samples.counts.values()), desc="writing shards", unit="sample", disable=not progress,
              leave=False) as bar:
        pending: deque = deque()

        def collect() -> None:
            r = pending.popleft().get()
            results.append(r)
            bar.update(r[0]["samples"])

        for split, k, records in shard_tasks(samples, samples_per_shard):
            if pool is None:
                results.append(write_shard(spec, str(out), split, k, records))
                bar.update(len(records))
                continue
            pending.append(pool.apply_async(write_shard, (spec, str(out), split, k, records)))
            if len(pending) >= 3 * workers:
                collect()
        while pending:
            collect()
    return results


def finish(data: Log, p: PrepareConfig, dropped: dict[str, int], removed_repeats: int,
           results: list[tuple[dict, dict]], write: callable) -> dict:
    """items.jsonl and meta.json from the shard results (in task order); returns the meta."""
    shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
    repeats = {s: {"target_in_history": 0, "shortcut": 0} for s in SPLITS}
    for entry, stats in results:
        split = entry["name"].split("-")[0]
        shards[split].append(entry)
        for k, v in stats.items():
            repeats[split][k] += v
    items = _items_jsonl(data.titles)
    write("items.jsonl", items)
    domain = p.domain or data.domain
    settings = {"source": data.source, "domain": domain, "n_items": len(data.titles),
                "history_len": p.history_len, "min_history": p.min_history,
                "num_candidates": p.num_candidates, "seed": p.seed}
    settings.update({k: getattr(p, k) for k, v in _NEW_SETTING_DEFAULTS.items() if getattr(p, k) != v})
    counts = {s: sum(e["samples"] for e in shards[s]) for s in SPLITS}
    meta = {
        "schema_version": SCHEMA_VERSION,
        **settings,
        "dedup": p.dedup,
        "negatives": p.negatives,
        "compression": p.compression,
        "n_users": data.n_users,
        "counts": counts,
        "shards": shards,
        "filtered": {**data.filtered, **dropped},
        # Items repeating another item's title: generated text naming such a title is ambiguous.
        "duplicate_titles": len(data.titles) - len(set(data.titles)),
        "repeats": _repeat_report(p, removed_repeats, repeats, counts),
        "fingerprint": _fingerprint(items, shards, settings),
    }
    write("meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _repeat_report(p: PrepareConfig, removed_repeats: int, repeats: dict, counts: dict) -> dict:
    """How often the target is also in its own history, and for valid/test how often it is the ONLY
    candidate in the history (with negatives=unseen, always when it is in the history: a shortcut a
    model can learn from the prompt alone). Train candidates are drawn at stream time from the same
    rule, so with negatives=unseen every train sample with its target in the history is a shortcut."""
    report = {"dedup": p.dedup, "removed_interactions": removed_repeats, "negatives": p.negatives}
    for s in SPLITS:
        n = counts[s]
        r = repeats[s]
        row = {"target_in_history": r["target_in_history"],
               "target_in_history_rate": round(r["target_in_history"] / n, 6) if n else 0.0}
        if s != "train":
            row["target_only_candidate_in_history"] = r["shortcut"]
            row["target_only_candidate_in_history_rate"] = round(r["shortcut"] / n, 6) if n else 0.0
        report[s] = row
    return report


def _pool(workers: int):
    """Shard-writing processes, forked while the parent is small (before any bucket is loaded)."""
    if workers <= 1:
        return None
    return multiprocessing.get_context("fork").Pool(workers)


def prepare_shards(data: Log, p: PrepareConfig, out: Path, *, tmp: Path | None = None,
                   progress: bool = True) -> dict:
    """Build the samples, draw the fixed valid/test candidates, write shards and meta.json; returns
    the meta. `tmp` holds the sample spills (default: a temporary directory under `prepare.tmp_dir`)."""
    if tmp is None:
        with tempfile.TemporaryDirectory(prefix="llara-prepare-", dir=p.tmp_dir) as t:
            return prepare_shards(data, p, out, tmp=Path(t), progress=progress)
    pool = _pool(p.workers)
    try:
        samples = spill_samples(data, p, tmp)
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        results = write_local(samples, ShardSpec.of(p, len(data.titles)), out, p.samples_per_shard, pool, p.workers,
                              progress)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return finish(data, p, samples.dropped, samples.removed_repeats, results,
                  lambda name, b: (out / name).write_bytes(b))


def _summary(meta: dict, out: Path | str) -> str:
    rows = [("source", meta["source"]), ("domain", meta["domain"]), ("users", meta["n_users"]),
            ("items", meta["n_items"])]
    rows += [(f"{s} samples", f"{meta['counts'][s]} in {len(meta['shards'][s])} shard(s)") for s in SPLITS]
    rows += [(f"dropped: {k}", v) for k, v in meta["filtered"].items()]
    if meta["duplicate_titles"]:
        rows.append(("items with a duplicate title", meta["duplicate_titles"]))
    rep = meta["repeats"]
    if rep["removed_interactions"]:
        rows.append((f"repeats removed (dedup={rep['dedup']})", rep["removed_interactions"]))
    rows.append(("target also in history", ", ".join(
        f"{s} {rep[s]['target_in_history_rate']:.2%}" for s in SPLITS)))
    rows.append(("target sole history candidate", ", ".join(
        f"{s} {rep[s]['target_only_candidate_in_history_rate']:.2%}" for s in ("valid", "test"))))
    rows += [("fingerprint", meta["fingerprint"][:16]), ("output", str(out))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _use_ray(p: PrepareConfig) -> bool:
    if p.engine != "auto":
        return p.engine == "ray"
    try:
        import ray
    except ImportError:  # pragma: no cover
        return False
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return False  # not connected to a cluster: nothing to spread over
    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    return len([n for n in ray.nodes() if n.get("Alive")]) > 1


def run_prepare(cfg: Config) -> Path | str:
    """The `prepare` command: read `cfg.prepare.format`, write shards to `cfg.prepare.out`."""
    p = cfg.prepare
    if _use_ray(p):
        from llara_dist.data.prepare_ray import prepare_ray

        meta = prepare_ray(p)
        out: Path | str = p.out
    else:
        out = Path(p.out)
        with tempfile.TemporaryDirectory(prefix="llara-prepare-", dir=p.tmp_dir) as tmp:
            data = load_source(p, Path(tmp))
            meta = prepare_shards(data, p, out, tmp=Path(tmp))
    print(f"prepared {out}:\n{_summary(meta, out)}")
    return out
