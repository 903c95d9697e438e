"""`llara-dist prepare`: raw interactions -> seeded samples -> WebDataset shards + meta.json.

Columnar and streaming: the log is read by Arrow into two flat arrays (items grouped by user, and
per-user offsets; see `Interactions`), a split is one int64 array of target positions, and each shard
is built from its slice of that array, written and forgotten. Memory is the per-user arrays plus
8-16 bytes per sample of index, never a Python object per sample.

Each shard is a pure function of (the arrays, its slice of targets, the seed): its valid/test
candidates come from a per-sample RNG keyed by the sample key, so shards can be written in any
order, by any number of processes (`prepare.workers`) or Ray tasks (`--engine ray`), with the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llara_dist.config import Config, PrepareConfig
from llara_dist.data.samples import (SPLITS, dedup_sequences, eval_candidates, split_positions,
                                     target_in_history, windows)
from llara_dist.data.shards import COMPRESSIONS, SCHEMA_VERSION, compress_shard, sha256_bytes, shard_name, tar_members
from llara_dist.data.sources import Interactions, generate_synthetic, load_grouplens, load_recbole, load_tabular
from llara_dist.errors import DataError

# Settings added after schema 1 enter the fingerprint only when they differ from these defaults,
# so a default prepare keeps the fingerprint (and the shards) it had before they existed.
_NEW_SETTING_DEFAULTS = {"dedup": "none", "negatives": "unseen", "compression": "none"}


def load_source(p: PrepareConfig) -> Interactions:
    if p.format == "synthetic":
        return generate_synthetic(p.users, p.items, p.seed)
    if not p.input:
        raise DataError(f"prepare.input: --format {p.format} needs --input PATH")
    if p.format == "recbole":
        return load_recbole(p.input, drop_unknown=p.drop_unknown, item_field=p.item_field,
                            title_field=p.title_field, user_field=p.user_field, time_field=p.time_field)
    if p.format in ("parquet", "csv"):
        return load_tabular(p.input, p.format, drop_unknown=p.drop_unknown, user_field=p.user_field,
                            item_field=p.item_field, time_field=p.time_field, title_field=p.title_field,
                            domain=p.domain or "movie")
    return load_grouplens(p.input, drop_unknown=p.drop_unknown)


def _items_jsonl(titles: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in enumerate(titles)).encode()


def _fingerprint(items: bytes, shards: dict, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(items).digest())
    h.update(json.dumps({"shards": shards, "settings": settings}, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# One shard: a pure function of the arrays and its slice of targets


@dataclass(frozen=True)
class ShardSpec:
    """What every shard writer shares (the big arrays travel once: fork, or Ray's object store)."""

    items: np.ndarray
    offsets: np.ndarray
    n_items: int
    history_len: int
    num_candidates: int
    seed: int
    negatives: str
    compression: str


def shard_file(spec: ShardSpec, split: str, targets: np.ndarray) -> tuple[bytes, dict[str, int]]:
    """(file bytes, repeat statistics) of one shard holding the samples whose targets are `targets`.

    The JSON is formatted by hand for speed; it is exactly ``json.dumps(sample, separators=(",", ":"))``
    of ``{"key", "user", "history", "target"[, "candidates"]}`` (a test checks against that).
    """
    H = spec.history_len
    users, hist, lens = windows(spec.items, spec.offsets, targets, H)
    positions = (targets - spec.offsets[users]).tolist()
    target_ids = spec.items[targets]
    in_history = (hist == target_ids[:, None]).any(axis=1)
    stats = {"target_in_history": int(in_history.sum()), "shortcut": 0}
    members = []
    with_candidates = split != "train"
    for u, pos, t, h, n, rep in zip(users.tolist(), positions, target_ids.tolist(), hist.tolist(), lens.tolist(),
                                    in_history.tolist()):
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
    return compress_shard(tar_members(members), spec.compression), stats


def write_shard(spec: ShardSpec, out: str, split: str, index: int, targets: np.ndarray) -> tuple[dict, dict]:
    """Write one shard under `out` (a local path or a pyarrow.fs URI); (meta entry, stats)."""
    data, stats = shard_file(spec, split, targets)
    name = shard_name(split, index, spec.compression)
    write_bytes(out, name, data)
    return {"name": name, "sha256": sha256_bytes(data), "samples": int(len(targets))}, stats


def write_bytes(out: str, name: str, data: bytes) -> None:
    if "://" in out:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(out)
        # compression=None: Arrow would otherwise gzip a ".gz" name a second time
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}", compression=None) as f:
            f.write(data)
    else:
        Path(out, name).write_bytes(data)


# Fork-shared state of the local process pool (set before the pool starts; read-only in workers).
_SPEC: ShardSpec | None = None


def _pool_write(task: tuple[str, str, int, np.ndarray]) -> tuple[dict, dict]:
    out, split, index, targets = task
    assert _SPEC is not None
    return write_shard(_SPEC, out, split, index, targets)


# ----------------------------------------------------------------------------------------------
# The plan shared by both engines


@dataclass
class Plan:
    spec: ShardSpec
    index: dict[str, np.ndarray]  # per split: target positions in stored order
    dropped: dict[str, int]
    removed_repeats: int
    samples_per_shard: int

    def tasks(self, out: str) -> list[tuple[str, str, int, np.ndarray]]:
        S = self.samples_per_shard
        return [(out, split, k, self.index[split][a:a + S])
                for split in SPLITS for k, a in enumerate(range(0, len(self.index[split]), S))]


def plan(data: Interactions, p: PrepareConfig) -> Plan:
    """Dedup, split and order the samples: cheap vectorised work, done once on the driver."""
    items, offsets, removed = dedup_sequences(data.items, data.offsets, p.dedup)
    index, dropped = split_positions(offsets, history_len=p.history_len, min_history=p.min_history)
    if not len(index["test"]):
        raise DataError(f"prepare: no user has more than min_history={p.min_history} interactions; "
                        "nothing to train or evaluate on")
    need = p.num_candidates - 1
    if p.negatives == "any" and len(data.titles) - 1 < need:
        raise DataError(f"num_candidates={p.num_candidates} needs {need} negatives but only "
                        f"{len(data.titles) - 1} items are not the target")
    # Train samples are stored in a seeded random order, so that a shard (and the stream's shuffle
    # buffer) mixes many users; valid/test stay in user order. (The same permutation as before the
    # columnar rewrite, so a default prepare writes the same bytes.)
    order = np.random.default_rng([p.seed & 0xFFFFFFFF, 7]).permutation(len(index["train"]))
    index["train"] = index["train"][order]
    del order
    spec = ShardSpec(items=items, offsets=offsets, n_items=len(data.titles), history_len=p.history_len,
                     num_candidates=p.num_candidates, seed=p.seed, negatives=p.negatives,
                     compression=p.compression)
    return Plan(spec, index, dropped, removed, p.samples_per_shard)


def clean_stale(out: Path) -> None:
    """Never leave shards of an earlier prepare next to the new ones."""
    for suffix in COMPRESSIONS.values():
        for stale in out.glob(f"*{suffix}"):
            if stale.name.split("-")[0] in SPLITS:
                stale.unlink()


def write_local(pl: Plan, out: Path, workers: int, progress: bool) -> list[tuple[dict, dict]]:
    global _SPEC
    tasks = pl.tasks(str(out))
    total = sum(len(t[3]) for t in tasks)
    results = []
    with tqdm(total=total, desc="writing shards", unit="sample", disable=not progress, leave=False) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                results.append(write_shard(pl.spec, *t))
                bar.update(len(t[3]))
        else:
            # fork: the workers share the arrays copy-on-write; imap keeps the shard order.
            _SPEC = pl.spec
            try:
                ctx = multiprocessing.get_context("fork")
                with ctx.Pool(min(workers, len(tasks))) as pool:
                    for r in pool.imap(_pool_write, tasks, chunksize=1):
                        results.append(r)
                        bar.update(r[0]["samples"])
            finally:
                _SPEC = None
    return results


def finish(data: Interactions, p: PrepareConfig, pl: Plan, results: list[tuple[dict, dict]],
           write: callable) -> dict:
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
    counts = {s: len(pl.index[s]) for s in SPLITS}
    meta = {
        "schema_version": SCHEMA_VERSION,
        **settings,
        "dedup": p.dedup,
        "negatives": p.negatives,
        "compression": p.compression,
        "n_users": data.n_users,
        "counts": counts,
        "shards": shards,
        "filtered": {**data.filtered, **pl.dropped},
        # Items repeating another item's title: generated text naming such a title is ambiguous.
        "duplicate_titles": len(data.titles) - len(set(data.titles)),
        "repeats": _repeat_report(p, pl, repeats, counts),
        "fingerprint": _fingerprint(items, shards, settings),
    }
    write("meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _repeat_report(p: PrepareConfig, pl: Plan, repeats: dict, counts: dict) -> dict:
    """How often the target is also in its own history, and for valid/test how often it is the ONLY
    candidate in the history (with negatives=unseen, always when it is in the history: a shortcut a
    model can learn from the prompt alone). Train candidates are drawn at stream time from the same
    rule, so with negatives=unseen every train sample with its target in the history is a shortcut."""
    report = {"dedup": p.dedup, "removed_interactions": pl.removed_repeats, "negatives": p.negatives}
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


def prepare_shards(data: Interactions, p: PrepareConfig, out: Path, *, progress: bool = True) -> dict:
    """Split, draw the fixed valid/test candidates, write shards and meta.json; returns the meta."""
    pl = plan(data, p)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    results = write_local(pl, out, p.workers, progress)
    return finish(data, p, pl, results, lambda name, b: (out / name).write_bytes(b))


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
        data = load_source(p)
        meta = prepare_shards(data, p, out)
    print(f"prepared {out}:\n{_summary(meta, out)}")
    return out
