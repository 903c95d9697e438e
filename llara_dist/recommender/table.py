"""The frozen item table: written once by ``train-rec``, read by the LLM side, checked on read.

A table trained on other data would silently inject the wrong items' embeddings, so loading it
checks the table against the shards it is about to be used with: catalogue size and data
fingerprint (``meta.json``'s ``fingerprint``, recorded as ``shards_fingerprint``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from llara_dist.errors import DataError

TABLE_FILE = "item_embeddings.safetensors"
TABLE_KEY = "item_embeddings"
META_FILE = "rec_meta.json"


def save_item_table(rec_dir: str | Path, table: np.ndarray) -> Path:
    """Write ``[n_items + 1, d]`` float32 (last row = padding) as ``item_embeddings.safetensors``."""
    path = Path(rec_dir) / TABLE_FILE
    save_file({TABLE_KEY: np.ascontiguousarray(table, dtype=np.float32)}, str(path))
    return path


def load_item_table(rec_dir: str | Path, shard_meta: dict) -> tuple[np.ndarray, dict]:
    """The frozen table ``[n_items + 1, d]`` float32 and ``rec_meta.json``, checked against the shards.

    Raises ``DataError`` when the files are missing or malformed, or when ``n_items`` or the data
    fingerprint disagree with ``shard_meta`` (the shards' ``meta.json``).
    """
    rec_dir = Path(rec_dir)
    table_path, meta_path = rec_dir / TABLE_FILE, rec_dir / META_FILE
    for p in (table_path, meta_path):
        if not p.is_file():
            raise DataError(f"{p}: not found (expected the output of `llara-dist train-rec --out {rec_dir}`)")
    try:
        rec_meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON: {e}") from None
    tensors = load_file(str(table_path))
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
