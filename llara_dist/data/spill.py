"""Bucketed on-disk record files: the external sort behind `prepare`'s bounded memory.

A `Spill` is a set of files, one per bucket, of fixed-size NumPy records. Records are appended in
batches, each routed to its bucket; a bucket is read back whole. A caller that routes by the top of
a sort key (or by a range of ids) and sorts each bucket on reading gets a global sort while holding
one bucket at a time: the classic distribution sort, with the disk as the buffer.

Records reach a bucket's file in the order they were appended, so a stable sort of a bucket keeps
the input order among equal keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Spill:
    def __init__(self, directory: Path, name: str, dtype: np.dtype, buckets: int) -> None:
        self.directory, self.name, self.dtype = Path(directory), name, np.dtype(dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.counts = np.zeros(max(1, buckets), dtype=np.int64)

    @property
    def buckets(self) -> int:
        return len(self.counts)

    def path(self, bucket: int) -> Path:
        return self.directory / f"{self.name}-{bucket:05d}.bin"

    def append(self, bucket: np.ndarray, records: np.ndarray) -> None:
        """Add `records` (dtype `self.dtype`), record i to bucket ``bucket[i]``."""
        if not len(records):
            return
        if self.buckets == 1:
            runs = [(0, 0, len(records))]
        else:
            order = np.argsort(bucket, kind="stable")  # stable: each bucket keeps the append order
            records, bucket = records[order], bucket[order]
            starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
            ends = np.r_[starts[1:], len(bucket)]
            runs = zip(bucket[starts].tolist(), starts.tolist(), ends.tolist())
        for b, a, e in runs:
            with open(self.path(b), "ab") as f:
                f.write(records[a:e].tobytes())
            self.counts[b] += e - a

    def read(self, bucket: int) -> np.ndarray:
        if not self.counts[bucket]:
            return np.zeros(0, dtype=self.dtype)
        return np.fromfile(self.path(bucket), dtype=self.dtype)

    def drop(self, bucket: int) -> None:
        """Delete a bucket's file once read (keeps the temporary disk use falling as work proceeds)."""
        self.path(bucket).unlink(missing_ok=True)


def top_bits_bucket(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each uint64 key by its top bits (`buckets` a power of two): buckets in order hold
    increasing key ranges, so sorting each bucket gives the global key order whatever `buckets` is."""
    shift = 64 - (buckets.bit_length() - 1)
    if shift >= 64:
        return np.zeros(len(keys), dtype=np.int64)
    return (keys >> np.uint64(shift)).astype(np.int64)


def power_of_two_at_least(n: float) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
