"""The frozen item table: written once by ``train-rec``, read by the LLM side, checked on read.

A table trained on other data would silently inject the wrong items' embeddings, so loading it
checks the table against the shards it is about to be used with: catalogue size and data
fingerprint (``meta.json``'s ``fingerprint``, recorded as ``shards_fingerprint``).

The table is read through the same filesystem layer as the shards (`data.storage.ShardDir`), so
``train.rec_dir`` may be a local/NFS path or a ``pyarrow.fs`` URI (s3://, gs://) every node sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save_file

from llara_dist.data.storage import ShardDir
from llara_dist.errors import DataError

TABLE_FILE = "item_embeddings.safetensors"
TABLE_KEY = "item_embeddings"
META_FILE = "rec_meta.json"


def save_item_table(rec_dir: str | Path, table: np.ndarray) -> Path:
    """Write ``[n_items + 1, d]`` float32 (last row = padding) as ``item_embeddings.safetensors``."""
    path = Path(rec_dir) / TABLE_FILE
    save_file({TABLE_KEY: np.ascontiguousarray(table, dtype=np.float32)}, str(path))
    return path


def load_item_table(rec_dir: str | Path | ShardDir, shard_meta: dict) -> tuple[np.ndarray, dict]:
    """The frozen table ``[n_items + 1, d]`` float32 and ``rec_meta.json``, checked against the shards.

    ``rec_dir`` is a local path, a ``pyarrow.fs`` URI or a `ShardDir`. Raises ``DataError`` when the
    files are missing or malformed, or when ``n_items`` or the data fingerprint disagree with
    ``shard_meta`` (the shards' ``meta.json``).
    """
    where = ShardDir.of(rec_dir)
    rec_dir = where.label
    table_path, meta_path = where.where(TABLE_FILE), where.where(META_FILE)
    for name, p in ((TABLE_FILE, table_path), (META_FILE, meta_path)):
        if not where.is_file(name):
            raise DataError(f"{p}: not found (expected the output of `llara-dist train-rec --out {rec_dir}`)")
    try:
        rec_meta = json.loads(where.read(META_FILE))
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON: {e}") from None
    try:
        tensors = load(where.read(TABLE_FILE))
    except SafetensorError as e:
        raise DataError(f"{table_path}: not a readable safetensors file ({e})") from None
    if TABLE_KEY not in tensors:
        raise DataError(f"{table_path}: no tensor named {TABLE_KEY!r} (found: {', '.join(tensors) or 'none'})")
    table = tensors[TABLE_KEY]

    n_items = int(shard_meta["n_items"])
    retrain = f"retrain it on these shards: `llara-dist train-rec --data SHARD_DIR --out {rec_dir}`"
    if table.ndim != 2 or table.shape[0] != n_items + 1:
        raise DataError(f"{table_path}: item table has shape {list(table.shape)}, but the shards have n_items="
                        f"{n_items}, so expected [{n_items + 1}, d] (n_items rows + 1 padding row); {retrain}")
    if table.shape[1] != rec_meta.get("dim"):
        raise DataError(f"{table_path}: item table is {table.shape[1]} wide but {meta_path} says dim="
                        f"{rec_meta.get('dim')}; the directory mixes files of two runs")
    if rec_meta.get("n_items") != n_items:
        raise DataError(f"{meta_path}: n_items is {rec_meta.get('n_items')}, but the shards have n_items={n_items}; "
                        f"{retrain}")
    fp_rec, fp_shards = rec_meta.get("shards_fingerprint"), shard_meta.get("fingerprint")
    if fp_rec != fp_shards:
        raise DataError(f"{meta_path}: shards_fingerprint {str(fp_rec)[:12]}... does not match the shards' "
                        f"fingerprint {str(fp_shards)[:12]}... (the table was trained on different data); {retrain}")
    if table.dtype != np.float32:
        table = table.astype(np.float32)
    return table, rec_meta
