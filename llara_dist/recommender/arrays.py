"""Shard samples -> fixed-shape arrays a recommender can batch: left-padded histories, targets,
stored candidates. Every id is checked against the catalogue here, once, with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from llara_dist.errors import DataError


@dataclass
class SplitArrays:
    seq: np.ndarray  # [N, max_len] int64, left-padded with n_items (most recent item last)
    target: np.ndarray  # [N] int64
    candidates: np.ndarray | None  # [N, C] int64 (valid/test: the stored candidates), else None
    users: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.target)


def samples_to_arrays(samples: Iterable[dict], n_items: int, max_len: int, *, where: str,
                      with_candidates: bool) -> SplitArrays:
    """Pack samples (``{"history", "target", "candidates"?, "user"?, "key"?}``) into arrays.

    ``where`` names the source in error messages (e.g. ``shards/ml-100k test split``). Histories
    longer than ``max_len`` keep their most recent ``max_len`` items.
    """
    seqs, targets, cands, users = [], [], [], []
    for i, s in enumerate(samples):
        key = s.get("key", f"#{i}")
        try:
            history = [int(x) for x in s["history"]][-max_len:]
            target = int(s["target"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: sample {key}: expected integer 'history' and 'target' ({e})") from None
        ids = history + [target]
        if with_candidates:
            if "candidates" not in s:
                raise DataError(f"{where}: sample {key}: missing 'candidates' (valid/test samples store them)")
            cand = [int(x) for x in s["candidates"]]
            if cand.count(target) != 1:
                raise DataError(f"{where}: sample {key}: target {target} must appear exactly once in 'candidates'")
            if cands and len(cand) != len(cands[0]):
                raise DataError(f"{where}: sample {key}: {len(cand)} candidates, expected {len(cands[0])} like the "
                                f"first sample")
            cands.append(cand)
            ids = ids + cand
        bad = [x for x in ids if not 0 <= x < n_items]
        if bad:
            raise DataError(f"{where}: sample {key}: item id {bad[0]} out of range [0, {n_items}) "
                            f"(n_items from meta.json)")
        seqs.append([n_items] * (max_len - len(history)) + history)
        targets.append(target)
        users.append(int(s.get("user", -1)))
    if not targets:
        raise DataError(f"{where}: no samples")
    return SplitArrays(
        seq=np.asarray(seqs, dtype=np.int64),
        target=np.asarray(targets, dtype=np.int64),
        candidates=np.asarray(cands, dtype=np.int64) if with_candidates else None,
        users=np.asarray(users, dtype=np.int64),
    )


def load_split(shard_dir: str | Path, split: str, meta: dict) -> SplitArrays:
    """Read one split of a shard directory through ``data.shards.read_split``."""
    from llara_dist.data.shards import read_split

    return samples_to_arrays(read_split(shard_dir, split), meta["n_items"], meta["history_len"],
                             where=f"{shard_dir} {split} split", with_candidates=split != "train")
