"""The training stream: seeded, rank-split micro-batches with an exact, world-size-free position.

Design. Every rank walks the *same* global order of an epoch: the train shards in a (seed, epoch)
permuted order, read with WebDataset's tar reader, through a seeded shuffle buffer. That order is
cut into global batches of ``world_size * batch_size`` samples and rank ``r`` keeps slice ``r`` of
each one, decoding (and drawing candidates for) only its own samples. Consequences:

- every rank yields exactly ``floor(N / (world_size * batch_size))`` batches per epoch, whatever
  the shard count (ZeRO-3 collectives hang when ranks disagree);
- the position is one number, the count of *global* samples consumed in the epoch, so resuming
  at any world size just skips that many raw samples and re-splits the rest;
- the price: each rank reads every shard's bytes (samples are ~100-200 bytes, so 1M samples are
  ~150 MB per epoch per rank), but parses, tokenises and collates only its own share.

DataLoader workers (``DataLoader(stream, batch_size=None, num_workers=W)``): worker ``w`` yields
batches ``w, w+W, ...`` of the rank's sequence, and the DataLoader's in-order round robin puts
them back in the single-process order, so the split stays exact. The worker processes' positions
do not reach the main process: use ``state_after(batches_consumed)`` there.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from llara_dist.data.samples import train_candidates
from llara_dist.data.shards import check_shards, decode_sample, load_meta, read_shard_bytes, shard_records
from llara_dist.errors import DataError


def buffered_shuffle(records: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded buffered shuffle (as WebDataset's, but with an explicit generator for exact replay)."""
    buf: list = []
    for r in records:
        if len(buf) < size:
            buf.append(r)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = r
    rng.shuffle(buf)
    yield from buf


class TrainStream(torch.utils.data.IterableDataset):
    """Micro-batches (``list[dict]`` of `batch_size` train samples with candidates), epoch after epoch."""

    def __init__(self, shard_dir: str | Path, *, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, num_candidates: int, skip_corrupt: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1")
        self.shard_dir = Path(shard_dir)
        meta = load_meta(self.shard_dir)
        self.n_items = meta["n_items"]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.buffer_size, self.num_candidates = seed, shuffle_buffer, num_candidates
        if num_candidates > self.n_items:
            raise DataError(f"num_candidates={num_candidates} exceeds the {self.n_items} items of {self.shard_dir}")
        # Every shard is checked up front: a damaged one is named before training starts, or
        # skipped by every rank alike (they all see the same files), so batch counts still agree.
        self.entries, self.skipped_shards = check_shards(self.shard_dir, "train", skip_corrupt=skip_corrupt)
        self.num_samples = sum(e["samples"] for e in self.entries)
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.shard_dir}: {self.num_samples} train samples are fewer than one global batch "
                            f"(world_size {world_size} x batch_size {batch_size})")
        self.epoch, self.offset = 0, 0

    # -- position --------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        epoch, offset = state.get("epoch"), state.get("offset")
        if not (isinstance(epoch, int) and isinstance(offset, int) and epoch >= 0 and 0 <= offset <= self.num_samples):
            raise DataError(f"stream state: expected {{'epoch': int >= 0, 'offset': 0..{self.num_samples}}}, "
                            f"got {state!r}")
        self.epoch, self.offset = epoch, offset

    def _advance(self, epoch: int, offset: int) -> tuple[int, int]:
        """The position after one more global batch; a partial last batch ends the epoch."""
        offset += self.global_batch
        if offset + self.global_batch > self.num_samples:
            return epoch + 1, 0
        return epoch, offset

    def state_after(self, batches: int) -> dict:
        """The position after `batches` more batches from the current one (for DataLoader use)."""
        epoch, offset = self.epoch, self.offset
        if offset + self.global_batch > self.num_samples:  # resumed at a world size too big for the rest
            epoch, offset = epoch + 1, 0
        for _ in range(batches):
            epoch, offset = self._advance(epoch, offset)
        return {"epoch": epoch, "offset": offset}

    # -- order -----------------------------------------------------------------------------------

    def _global_order(self, epoch: int) -> Iterator[tuple[str, bytes]]:
        """(shard name, raw sample bytes) of the whole epoch, identical on every rank."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, 2, epoch])
        order = rng.permutation(len(self.entries)).tolist()
        buffer_rng = random.Random(int(rng.integers(1 << 62)))

        def records():
            for i in order:
                entry = self.entries[i]
                data = read_shard_bytes(self.shard_dir, entry)
                for _, raw in shard_records(entry["name"], data):
                    yield entry["name"], raw

        return buffered_shuffle(records(), self.buffer_size, buffer_rng)

    def _rank_slices(self, epoch: int, offset: int) -> Iterator[list[tuple[str, bytes]]]:
        """This rank's raw slice of every full global batch from `offset` to the end of the epoch."""
        order = self._global_order(epoch)

        def short() -> DataError:
            return DataError(f"{self.shard_dir}: the train shards hold fewer samples than meta.json's "
                             f"counts ({self.num_samples}); re-run `llara-dist prepare`")

        def take(n: int) -> list[tuple[str, bytes]]:
            got = list(islice(order, n))
            if len(got) < n:
                raise short()
            return got

        # Resume: skip what was consumed, without decoding (or keeping) it.
        if sum(1 for _ in islice(order, offset)) < offset:
            raise short()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for _ in range((self.num_samples - offset) // self.global_batch):
            yield take(self.global_batch)[lo:hi]

    def _decode(self, raw: list[tuple[str, bytes]], epoch: int) -> list[dict]:
        samples = []
        for shard, data in raw:
            s = decode_sample(data, shard=shard, n_items=self.n_items, with_candidates=False)
            s["candidates"] = train_candidates(s, self.n_items, self.num_candidates, self.seed, epoch)
            samples.append(s)
        return samples

    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = 0
        while True:
            epoch, offset = self.epoch, self.offset
            for raw in self._rank_slices(epoch, offset):
                self.epoch, self.offset = self._advance(self.epoch, self.offset)
                if index % workers == worker:
                    yield self._decode(raw, epoch)
                index += 1
            if (self.epoch, self.offset) == (epoch, offset):  # the epoch had no full batch left
                self.epoch, self.offset = epoch + 1, 0
