"""The training stream: seeded rank-split micro-batches; each rank reads ~1/world of the shard bytes.

The order of an epoch does not depend on the world size. It is built from the shards alone:

1. The train shards are permuted from ``(seed, epoch)`` and laid end to end: the *epoch sequence*.
2. The sequence is cut into ``R`` contiguous *canonical ranges* of equal length (+-1 sample);
   ``R`` is fixed for the data set (``canonical_ranges``, default 192 = 2^6 x 3, lowered to a
   divisor of it when there are fewer samples), never by the world size.
3. Each range is cut into blocks of ``shuffle_buffer`` samples, and each block is shuffled with
   WebDataset's own shuffle, from an rng seeded by ``(seed, epoch, range, block)``.
4. Global position ``g`` takes sample ``g // R`` of the range in *slot* ``g % R``: the ranges are
   interleaved round robin, so any window of the order mixes samples from all over the data.

Rank ``r`` of ``W`` takes the global positions ``g`` with ``g % W == r``, in order: any
``W * batch_size`` consecutive positions hold exactly ``batch_size`` of them, so every rank yields
the same number of batches, from any starting position. When ``W`` divides ``R``, the positions
of rank ``r`` all lie in the ranges of slots ``m % W == r``; slots are mapped to ranges by mixed
radix *digit reversal* over the prime factors of ``R`` (2s first), so for ``W`` = 1, 2, 4, ..., 64,
192 those ranges are *contiguous* in the epoch sequence: the rank reads ``1/W`` of the bytes plus
the parts of at most two shards it shares with its neighbours. Other divisors of ``R`` (3, 6,
12, 24, 48, 96) also read 1/W, in ``R/W`` pieces (each piece may share a shard with the next).
A world size that does not divide ``R`` still gets an exact split but reads
``1/gcd(W, R)`` of the bytes (a warning says so).

Compared with MosaicML Streaming (py1e shuffle + ``orig`` partition), which this follows in
spirit: no sample is ever padded or repeated (ranges differ by at most one sample and only the
partial last global batch of an epoch is left out); a world size that does not divide the
canonical count still works (exactly, at more bytes per rank) instead of being refused; a rank
reads one contiguous stretch for power-of-two world sizes instead of ``R/W`` scattered ones;
and the shard order is redrawn every epoch (Streaming fixes it for the run to keep its node-local
cache; we read from shared storage and gain cross-epoch mixing).

The position is one number, ``offset``: global samples consumed in the epoch (plus the order's
parameters, checked on load). Resuming at any world size computes, for each range the rank
needs, the block holding its next position, reads the shards of that block and skips inside
it: a few shards per range, not a re-read of the epoch.

Each shard a rank reads is read once per epoch: a shard shared by two of the rank's ranges
stays in memory until both have passed it. Memory per rank: about ``R/W`` blocks plus ``R/W``
parsed shards (the raw JSON of their samples, not the 1 KB-per-sample tar).
"""

from __future__ import annotations

import bisect
import math
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from webdataset.filters import _shuffle as wds_shuffle

from llara_dist.data.samples import train_candidates
from llara_dist.data.shards import check_shards, decode_sample, fetch_shard, load_meta, shard_records
from llara_dist.data.storage import ShardDir
from llara_dist.errors import DataError

DEFAULT_RANGES = 192  # 2^6 x 3: world sizes 1-64 in powers of two, and 3, 6, 12, 24, 48, 96, 192
_MASK = 0xFFFFFFFFFFFFFFFF


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def digit_reversal(n: int) -> np.ndarray:
    """Range index for each slot ``m < n``: the mixed-radix digits of ``m`` (radices = the prime
    factors of ``n``, ascending) read in reverse. For ``W`` a product of the first radices, the
    slots ``m % W == r`` map to one contiguous block of ``n / W`` ranges."""
    radices = _prime_factors(n)
    out = np.empty(n, np.int64)
    for m in range(n):
        k, rest, weight = 0, m, n
        for p in radices:
            weight //= p
            k += (rest % p) * weight
            rest //= p
        out[m] = k
    return out


def canonical_ranges(num_samples: int, wanted: int = DEFAULT_RANGES) -> int:
    """The range count for a data set: `wanted`, or its largest divisor that leaves >= 1 sample each."""
    return max(d for d in range(1, wanted + 1) if wanted % d == 0 and d <= max(1, num_samples))


class _EpochOrder:
    """Where every global position of one epoch lives; identical on every rank."""

    def __init__(self, entries: list[dict], *, seed: int, epoch: int, ranges: int, block: int):
        rng = np.random.default_rng([seed & _MASK, 2, epoch])
        self.shards = [entries[i] for i in rng.permutation(len(entries))]  # epoch-sequence order
        sizes = [e["samples"] for e in self.shards]
        self.shard_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.num_samples = self.shard_start[-1]
        self.seed, self.epoch, self.ranges, self.block = seed, epoch, ranges, block
        self.full, self.extra = divmod(self.num_samples, ranges)  # every range has `full`, some one more
        self.range_of_slot = digit_reversal(ranges).tolist()
        slot_of_range = np.argsort(self.range_of_slot)
        # The ranges of the first `extra` slots hold one more sample (the last, partial round).
        self.range_len = [self.full + int(slot_of_range[k] < self.extra) for k in range(ranges)]
        self.range_start = np.concatenate([[0], np.cumsum(self.range_len, dtype=np.int64)]).tolist()

    def locate(self, g: int) -> tuple[int, int]:
        """(range, index in range) of global position `g`."""
        full_rounds = self.ranges * self.full
        if g < full_rounds:
            return self.range_of_slot[g % self.ranges], g // self.ranges
        return self.range_of_slot[g - full_rounds], self.full

    def block_span(self, k: int, b: int) -> tuple[int, int]:
        """Epoch-sequence [start, end) of block `b` of range `k`."""
        start = self.range_start[k] + b * self.block
        return start, min(start + self.block, self.range_start[k] + self.range_len[k])

    def shards_of(self, start: int, end: int) -> range:
        """Positions in the epoch sequence's shard list of the shards holding [start, end)."""
        first = bisect.bisect_right(self.shard_start, start) - 1
        last = bisect.bisect_right(self.shard_start, end - 1) - 1
        return range(first, last + 1)

    def block_permutation(self, k: int, b: int, n: int) -> list[int]:
        """The order of block (k, b): WebDataset's shuffle of ``0..n-1`` with a seeded rng."""
        state = np.random.SeedSequence([self.seed & _MASK, 3, self.epoch, k, b]).generate_state(2, np.uint64)
        rng = random.Random(int(state[0]) << 64 | int(state[1]))
        return list(wds_shuffle(iter(range(n)), bufsize=n, initial=n, rng=rng))


class TrainStream(torch.utils.data.IterableDataset):
    """Micro-batches (``list[dict]`` of `batch_size` train samples with candidates), epoch after epoch.

    `shard_dir` is a local/NFS path, a ``pyarrow.fs`` URI (``s3://bucket/shards``) or a `ShardDir`.
    `bytes_read` counts the bytes this stream has read from storage (shards as stored).
    """

    def __init__(self, shard_dir: str | Path | ShardDir, *, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, num_candidates: int, skip_corrupt: bool = False,
                 canonical: int = DEFAULT_RANGES):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or shuffle_buffer < 1 or canonical < 1:
            raise ValueError("batch_size, shuffle_buffer and canonical must be >= 1")
        self.location = ShardDir.of(shard_dir)
        self.shard_dir = self.location.label
        meta = load_meta(self.location)
        self.n_items = meta["n_items"]
        self.negatives = meta.get("negatives", "unseen")  # train candidates follow prepare's rule
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.block, self.num_candidates = seed, shuffle_buffer, num_candidates
        if num_candidates > self.n_items:
            raise DataError(f"num_candidates={num_candidates} exceeds the {self.n_items} items of {self.shard_dir}")
        # Without skip_corrupt this is one directory listing (missing or truncated shards are named
        # now); each shard's sha256 is checked when it is read. Skipping needs every rank to agree
        # on the bad shards up front, so skip_corrupt hashes every shard here (one full read).
        self.entries, self.skipped_shards = check_shards(self.location, "train", skip_corrupt=skip_corrupt)
        self.num_samples = sum(e["samples"] for e in self.entries)
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.shard_dir}: {self.num_samples} train samples are fewer than one global batch "
                            f"(world_size {world_size} x batch_size {batch_size})")
        self.ranges = canonical_ranges(self.num_samples, canonical)
        self.reads_fraction = 1 / math.gcd(world_size, self.ranges)
        if self.ranges % world_size:
            warnings.warn(f"world size {world_size} does not divide the stream's {self.ranges} canonical ranges: "
                          f"each rank reads {self.reads_fraction:.0%} of the train shards instead of "
                          f"1/{world_size} (the split is still exact)", stacklevel=2)
        self.epoch, self.offset = 0, 0
        self.bytes_read = 0

    # -- position --------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def state_dict(self) -> dict:
        """The position (world-size free) and the order's parameters, which a resume must share."""
        return {"epoch": self.epoch, "offset": self.offset, "ranges": self.ranges, "block": self.block}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "ranges" not in state:
            raise DataError(f"stream state {state!r}: written by an older TrainStream whose order this one does "
                            "not reproduce; the position cannot be mapped. Start the run again (new run "
                            "directory) or resume with the llara-dist version that wrote it")
        epoch, offset = state.get("epoch"), state.get("offset")
        if not (isinstance(epoch, int) and isinstance(offset, int) and epoch >= 0 and 0 <= offset <= self.num_samples):
            raise DataError(f"stream state: expected {{'epoch': int >= 0, 'offset': 0..{self.num_samples}, ...}}, "
                            f"got {state!r}")
        if (state["ranges"], state.get("block")) != (self.ranges, self.block):
            raise DataError(f"stream state: saved with {state['ranges']} canonical ranges and shuffle blocks of "
                            f"{state.get('block')}, this stream has {self.ranges} and {self.block} "
                            "(data.shuffle_buffer changed?): the order would differ; keep the original settings")
        self.epoch, self.offset = epoch, offset

    def _advance(self, epoch: int, offset: int) -> tuple[int, int]:
        """The position after one more global batch; a partial last batch ends the epoch."""
        offset += self.global_batch
        if offset + self.global_batch > self.num_samples:
            return epoch + 1, 0
        return epoch, offset

    # -- reading ---------------------------------------------------------------------------------

    def _rank_batches(self, epoch: int, offset: int) -> Iterator[list[tuple[str, bytes]]]:
        """This rank's raw samples of every full global batch from `offset` to the end of the epoch."""
        order = _EpochOrder(self.entries, seed=self.seed, epoch=epoch, ranges=self.ranges, block=self.block)
        world, bs, gb = self.world_size, self.batch_size, self.global_batch
        n_batches = (self.num_samples - offset) // gb

        # Shards stay parsed in memory while any range of this rank still needs them: refs[p] counts
        # those ranges, from the block of each range's next position to the range's end.
        refs: dict[int, int] = {}
        step = math.gcd(world, self.ranges)
        first_block: dict[int, int] = {}
        for m in range(self.rank % step, self.ranges, step):
            k = order.range_of_slot[m]
            rounds_done = max(0, -(-(offset - m) // self.ranges))  # first index j with j*R + m >= offset
            if rounds_done >= order.range_len[k]:
                continue
            first_block[k] = rounds_done // self.block
            start, _ = order.block_span(k, first_block[k])
            for p in order.shards_of(start, order.range_start[k] + order.range_len[k]):
                refs[p] = refs.get(p, 0) + 1
        cache: dict[int, list[tuple[str, bytes]]] = {}
        held_from = {k: order.shards_of(*order.block_span(k, b)).start for k, b in first_block.items()}
        blocks: dict[int, tuple[int, list[tuple[str, bytes]]]] = {}

        def shard(p: int) -> list[tuple[str, bytes]]:
            if p not in cache:
                entry = order.shards[p]
                data, stored = fetch_shard(self.location, entry)
                self.bytes_read += stored
                recs = [(entry["name"], raw) for _, raw in shard_records(entry["name"], data)]
                if len(recs) != entry["samples"]:
                    raise DataError(f"{self.location.where(entry['name'])}: {len(recs)} samples, but meta.json "
                                    f"says {entry['samples']}; re-run `llara-dist prepare`")
                cache[p] = recs
            return cache[p]

        def load_block(k: int, b: int) -> list[tuple[str, bytes]]:
            start, end = order.block_span(k, b)
            span = order.shards_of(start, end)
            for p in range(held_from[k], span.start):  # this range is past these shards for good
                refs[p] -= 1
                if refs[p] == 0:
                    cache.pop(p, None)
            held_from[k] = span.start
            raw = []
            for p in span:
                lo = max(start, order.shard_start[p]) - order.shard_start[p]
                hi = min(end, order.shard_start[p + 1]) - order.shard_start[p]
                raw.extend(shard(p)[lo:hi])
            return [raw[i] for i in order.block_permutation(k, b, len(raw))]

        for i in range(n_batches):
            base = offset + i * gb
            out = []
            for g in range(base + (self.rank - base) % world, base + gb, world):
                k, j = order.locate(g)
                b = j // self.block
                if k not in blocks or blocks[k][0] != b:
                    blocks[k] = (b, load_block(k, b))
                out.append(blocks[k][1][j - b * self.block])
            assert len(out) == bs
            yield out

    def _decode(self, raw: list[tuple[str, bytes]], epoch: int) -> list[dict]:
        samples = []
        for shard, data in raw:
            s = decode_sample(data, shard=shard, n_items=self.n_items, with_candidates=False)
            s["candidates"] = train_candidates(s, self.n_items, self.num_candidates, self.seed, epoch,
                                               negatives=self.negatives)
            samples.append(s)
        return samples

    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("TrainStream keeps its position in the iterating process: use it directly or "
                               "with DataLoader(num_workers=0 or 1), not with several DataLoader workers")
        while True:
            epoch, offset = self.epoch, self.offset
            for raw in self._rank_batches(epoch, offset):
                self.epoch, self.offset = self._advance(self.epoch, self.offset)
                yield self._decode(raw, epoch)
            if (self.epoch, self.offset) == (epoch, offset):  # the epoch had no full batch left
                self.epoch, self.offset = epoch + 1, 0
