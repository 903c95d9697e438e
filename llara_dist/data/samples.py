"""Per-user sequences -> leave-last-out samples (sliding windows) and seeded candidate sets.

A sample is ``{"key": "u12-t34", "user": 12, "history": [ids, oldest first], "target": 56}``; the key
names the user and the target's position in that user's sequence, so it is unique across splits.

Splits (leave-last-out): a user's last interaction is the test target, the one before the valid
target, and every earlier one a train target. Histories only look backwards, so no valid or test
target is ever seen by a train sample.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llara_dist.errors import DataError

SPLITS = ("train", "valid", "test")

# Separate streams of randomness for fixed (valid/test) and per-epoch (train) candidates.
_EVAL_STREAM, _TRAIN_STREAM = 0, 1


def sample_key(user: int, position: int) -> str:
    return f"u{user}-t{position}"


def _window(seq: list[int], position: int, history_len: int) -> list[int]:
    return seq[max(0, position - history_len):position]


def split_samples(sequences: Sequence[list[int]], *, history_len: int,
                  min_history: int) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Leave-last-out samples per split, in user order, plus counts of what was dropped."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    dropped = {"short_history_samples": 0, "users_without_test_sample": 0}
    for user, seq in enumerate(sequences):
        n = len(seq)
        if n - 1 < min_history:  # not even the test target has enough history
            dropped["users_without_test_sample"] += 1
        for pos in range(1, n):
            split = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            history = _window(seq, pos, history_len)
            if len(history) < min_history:
                dropped["short_history_samples"] += 1
                continue
            out[split].append({"key": sample_key(user, pos), "user": user, "history": history,
                               "target": seq[pos]})
    return out, dropped


# ----------------------------------------------------------------------------------------------
# The same splits, columnar: a sample is the global index of its target in the flat item array
# (`Interactions.items`), so a split of 20M samples is one int64 array, not 20M dicts.


def split_positions(offsets: np.ndarray, *, history_len: int,
                    min_history: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """`split_samples` vectorised: per split the targets' global indices, in user order."""
    starts = offsets[:-1]
    n = np.diff(offsets)
    ok = history_len >= min_history  # else no window is ever long enough
    # train: positions min_history .. n-3 (a train target needs min_history items before it)
    counts = np.maximum(n - 2 - min_history, 0) if ok else np.zeros_like(n)
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    train = np.arange(total, dtype=np.int64) + np.repeat(starts + min_history - first, counts)
    out = {"train": train}
    for split, back in (("valid", 2), ("test", 1)):
        pos = n - back
        keep = (pos >= 1) & (pos >= min_history) & ok
        out[split] = (starts + pos)[keep].astype(np.int64)
    kept = sum(len(v) for v in out.values())
    dropped = {"short_history_samples": int(np.maximum(n - 1, 0).sum()) - kept,
               "users_without_test_sample": int((n - 1 < min_history).sum())}
    return out, dropped


# ----------------------------------------------------------------------------------------------
# Samples as fixed-size records: what `prepare` spills to disk and writes into shards


def record_dtype(history_len: int) -> np.dtype:
    """One sample: its shuffle key, user, target position, target and left-padded (-1) history."""
    return np.dtype([("key", "<u8"), ("user", "<i4"), ("pos", "<i4"), ("target", "<i4"),
                     ("hist", "<i4", (history_len,))])


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look uniform."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def shuffle_keys(seed: int, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The stored order of train samples: sorting by this key (ties by user, position) is a seeded
    shuffle that is a pure function of each sample, so it can be computed in any number of pieces
    (the partitions of an external sort, Ray tasks) and sorted bucket by bucket."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([_seed_words(seed)], dtype=np.uint64) + _GOLD)[0]
        ids = (users.astype(np.uint64) << np.uint64(32)) | positions.astype(np.uint64)
        return _mix64(ids ^ salt)


@dataclass(frozen=True)
class UserChunk:
    """Some users' sequences: ``items[offsets[k]:offsets[k + 1]]`` is user ``users[k]``'s (dense id)."""

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray

    @classmethod
    def from_sorted(cls, users: np.ndarray, items: np.ndarray) -> "UserChunk":
        """From one row per interaction, already sorted by user (then time)."""
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
        return cls(users[starts], np.r_[starts, len(users)].astype(np.int64), items)


@dataclass
class ChunkSamples:
    records: dict[str, np.ndarray]  # per split, `record_dtype` records
    dropped: dict[str, int]
    removed_repeats: int


def chunk_samples(chunk: UserChunk, *, history_len: int, min_history: int, dedup: str,
                  seed: int) -> ChunkSamples:
    """Every sample of a chunk of users as records (vectorised: windows by fancy indexing)."""
    items, offsets, removed = dedup_sequences(chunk.items, chunk.offsets, dedup)
    index, dropped = split_positions(offsets, history_len=history_len, min_history=min_history)
    dtype = record_dtype(history_len)
    records = {}
    for split, targets in index.items():
        local, hist, _ = windows(items, offsets, targets, history_len)
        rec = np.empty(len(targets), dtype=dtype)
        rec["user"] = chunk.users[local]
        rec["pos"] = targets - offsets[local]
        rec["target"] = items[targets]
        rec["hist"] = hist
        rec["key"] = shuffle_keys(seed, rec["user"], rec["pos"]) if split == "train" else 0
        records[split] = rec
    return ChunkSamples(records, dropped, removed)


def users_of(offsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, targets, side="right") - 1


def windows(items: np.ndarray, offsets: np.ndarray, targets: np.ndarray,
            history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, (n, history_len) history matrix left-padded with -1, history lengths) of `targets`."""
    users = users_of(offsets, targets)
    idx = targets[:, None] - history_len + np.arange(history_len)
    valid = idx >= offsets[users][:, None]
    hist = np.where(valid, items[np.maximum(idx, 0)], -1)
    return users, hist, valid.sum(axis=1)


def dedup_sequences(items: np.ndarray, offsets: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Collapse repeated items in each user's sequence: ``consecutive`` drops an item equal to the one
    just before it; ``all`` keeps only each item's first occurrence. Returns (items, offsets, removed)."""
    if mode == "none" or len(items) == 0:
        return items, offsets, 0
    users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    if mode == "consecutive":
        keep = np.ones(len(items), dtype=bool)
        keep[1:] = (items[1:] != items[:-1]) | (users[1:] != users[:-1])
    elif mode == "all":
        key = users.astype(np.int64) * (int(items.max()) + 1) + items
        _, first = np.unique(key, return_index=True)  # first index of each (user, item)
        keep = np.zeros(len(items), dtype=bool)
        keep[first] = True
    else:
        raise DataError(f"prepare.dedup: expected one of none, consecutive, all, got {mode!r}")
    counts = np.bincount(users[keep], minlength=len(offsets) - 1)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(counts, out=new_offsets[1:])
    return items[keep], new_offsets, int(len(items) - keep.sum())


def _seed_words(seed: int) -> int:
    return seed & 0xFFFFFFFFFFFFFFFF  # SeedSequence wants non-negative entropy


NEGATIVES = ("unseen", "any")


def draw_candidates(rng: np.random.Generator, target: int, history: Sequence[int], n_items: int,
                    num_candidates: int, negatives: str = "unseen") -> list[int]:
    """The target plus ``num_candidates - 1`` distinct negatives drawn uniformly from the items that
    are neither the target nor (with ``negatives="unseen"``) in the history; shuffled.

    ``negatives="any"`` lets history items be negatives too: on logs with repeats, "unseen" leaves
    the target as the only candidate that can also be in the history (a shortcut for the model).
    """
    excluded = set(history) if negatives == "unseen" else set()
    excluded.add(target)
    need = num_candidates - 1
    available = n_items - len(excluded)
    if available < need:
        raise DataError(f"num_candidates={num_candidates} needs {need} negatives but only {available} "
                        f"of the {n_items} items are outside a sample's history and target")
    if need <= available // 2:
        # Rejection sampling: cheap when most items are allowed (the common case).
        chosen: list[int] = []
        seen = set(excluded)
        while len(chosen) < need:
            for x in rng.integers(0, n_items, size=2 * need).tolist():
                if x not in seen:
                    seen.add(x)
                    chosen.append(x)
                    if len(chosen) == need:
                        break
    else:
        pool = np.setdiff1d(np.arange(n_items), np.fromiter(excluded, dtype=np.int64))
        chosen = rng.choice(pool, size=need, replace=False).tolist()
    candidates = chosen + [target]
    rng.shuffle(candidates)
    return candidates


def eval_candidates(sample: dict, n_items: int, num_candidates: int, seed: int,
                    negatives: str = "unseen") -> list[int]:
    """Fixed valid/test candidates: drawn once at prepare time from (seed, sample key)."""
    rng = np.random.default_rng([_seed_words(seed), _EVAL_STREAM, zlib.crc32(sample["key"].encode())])
    return draw_candidates(rng, sample["target"], sample["history"], n_items, num_candidates, negatives)


def train_candidates(sample: dict, n_items: int, num_candidates: int, seed: int, epoch: int,
                     negatives: str = "unseen") -> list[int]:
    """Train-time candidates, drawn while streaming from (seed, epoch, sample key): a resumed run
    draws exactly the same ones. `negatives` is meta.json's ``negatives`` (absent means "unseen")."""
    rng = np.random.default_rng([_seed_words(seed), _TRAIN_STREAM, epoch, zlib.crc32(sample["key"].encode())])
    return draw_candidates(rng, sample["target"], sample["history"], n_items, num_candidates, negatives)
