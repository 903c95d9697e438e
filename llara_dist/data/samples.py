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


def _seed_words(seed: int) -> int:
    return seed & 0xFFFFFFFFFFFFFFFF  # SeedSequence wants non-negative entropy


def draw_candidates(rng: np.random.Generator, target: int, history: Sequence[int], n_items: int,
                    num_candidates: int) -> list[int]:
    """The target plus ``num_candidates - 1`` distinct negatives drawn uniformly from the items that
    are neither the target nor in the history; shuffled."""
    excluded = set(history)
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


def eval_candidates(sample: dict, n_items: int, num_candidates: int, seed: int) -> list[int]:
    """Fixed valid/test candidates: drawn once at prepare time from (seed, sample key)."""
    rng = np.random.default_rng([_seed_words(seed), _EVAL_STREAM, zlib.crc32(sample["key"].encode())])
    return draw_candidates(rng, sample["target"], sample["history"], n_items, num_candidates)


def train_candidates(sample: dict, n_items: int, num_candidates: int, seed: int, epoch: int) -> list[int]:
    """Train-time candidates, drawn while streaming from (seed, epoch, sample key): a resumed run
    draws exactly the same ones."""
    rng = np.random.default_rng([_seed_words(seed), _TRAIN_STREAM, epoch, zlib.crc32(sample["key"].encode())])
    return draw_candidates(rng, sample["target"], sample["history"], n_items, num_candidates)
