"""`llara-dist prepare`: raw interactions -> seeded samples -> WebDataset shards + meta.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llara_dist.config import Config, PrepareConfig
from llara_dist.data.samples import SPLITS, eval_candidates, split_samples
from llara_dist.data.shards import SCHEMA_VERSION, write_split
from llara_dist.data.sources import Interactions, generate_synthetic, load_grouplens, load_recbole
from llara_dist.errors import DataError


def load_source(p: PrepareConfig) -> Interactions:
    if p.format == "synthetic":
        return generate_synthetic(p.users, p.items, p.seed)
    if not p.input:
        raise DataError(f"prepare.input: --format {p.format} needs --input DIR")
    if p.format == "recbole":
        return load_recbole(p.input, drop_unknown=p.drop_unknown, item_field=p.item_field, title_field=p.title_field)
    return load_grouplens(p.input, drop_unknown=p.drop_unknown)


def _items_jsonl(titles: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in enumerate(titles)).encode()


def _fingerprint(items: bytes, shards: dict, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(items).digest())
    h.update(json.dumps({"shards": shards, "settings": settings}, sort_keys=True).encode())
    return h.hexdigest()


def prepare_shards(data: Interactions, p: PrepareConfig, out: Path, *, progress: bool = True) -> dict:
    """Split, draw the fixed valid/test candidates, write shards and meta.json; returns the meta."""
    n_items = len(data.titles)
    samples, dropped = split_samples(data.sequences, history_len=p.history_len, min_history=p.min_history)
    if not samples["test"]:
        raise DataError(f"prepare: no user has more than min_history={p.min_history} interactions; "
                        "nothing to train or evaluate on")
    evaluated = samples["valid"] + samples["test"]
    for s in tqdm(evaluated, desc="valid/test candidates", unit="sample", disable=not progress, leave=False):
        s["candidates"] = eval_candidates(s, n_items, p.num_candidates, p.seed)
    # Train samples are stored in a seeded random order, so that a shard (and the stream's shuffle
    # buffer) mixes many users; valid/test stay in user order.
    order = np.random.default_rng([p.seed & 0xFFFFFFFF, 7]).permutation(len(samples["train"]))
    samples["train"] = [samples["train"][i] for i in order.tolist()]

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tar"):  # never leave shards of an earlier prepare next to the new ones
        if stale.name.split("-")[0] in SPLITS:
            stale.unlink()
    shards = {}
    total = sum(len(v) for v in samples.values())
    with tqdm(total=total, desc="writing shards", unit="sample", disable=not progress, leave=False) as bar:
        for split in SPLITS:
            shards[split] = write_split(out, split, samples[split], p.samples_per_shard, progress=bar.update)
    items = _items_jsonl(data.titles)
    (out / "items.jsonl").write_bytes(items)

    domain = p.domain or data.domain
    settings = {"source": data.source, "domain": domain, "n_items": n_items, "history_len": p.history_len,
                "min_history": p.min_history, "num_candidates": p.num_candidates, "seed": p.seed}
    meta = {
        "schema_version": SCHEMA_VERSION,
        **settings,
        "n_users": len(data.sequences),
        "counts": {s: len(samples[s]) for s in SPLITS},
        "shards": shards,
        "filtered": {**data.filtered, **dropped},
        # Items repeating another item's title: generated text naming such a title is ambiguous.
        "duplicate_titles": len(data.titles) - len(set(data.titles)),
        "fingerprint": _fingerprint(items, shards, settings),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _summary(meta: dict, out: Path) -> str:
    rows = [("source", meta["source"]), ("domain", meta["domain"]), ("users", meta["n_users"]),
            ("items", meta["n_items"])]
    rows += [(f"{s} samples", f"{meta['counts'][s]} in {len(meta['shards'][s])} shard(s)") for s in SPLITS]
    rows += [(f"dropped: {k}", v) for k, v in meta["filtered"].items()]
    if meta["duplicate_titles"]:
        rows.append(("items with a duplicate title", meta["duplicate_titles"]))
    rows += [("fingerprint", meta["fingerprint"][:16]), ("output", str(out))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_prepare(cfg: Config) -> Path:
    """The `prepare` command: read `cfg.prepare.format`, write shards to `cfg.prepare.out`."""
    p = cfg.prepare
    out = Path(p.out)
    data = load_source(p)
    meta = prepare_shards(data, p, out)
    print(f"prepared {out}:\n{_summary(meta, out)}")
    return out
