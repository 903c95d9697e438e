"""Train-shard encoding alone: samples/s of the per-sample path vs the column-wise one, in one run.

`prepare` turns each shard's records into a tar of JSON members (`prepare.shard_file`). Train
shards are built column-wise (`_train_tar`); the per-sample loop valid/test still use is the
reference. This times both on the same synthetic records (default: 2000-sample shards, history 10,
ids up to 20k, histories of every length), checks they give the same bytes, and prints CPU time
(``time.process_time``, the best of `--repeats` per shard; the machine's load is printed too)::

    python benchmarks/bench_encode.py --shards 50 --history-len 10 20 50
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from llara_dist.data.prepare import ShardSpec, _members_per_sample, shard_file
from llara_dist.data.samples import record_dtype
from llara_dist.data.shards import tar_members


def records(rng: np.random.Generator, n: int, history_len: int, n_items: int) -> np.ndarray:
    out = np.zeros(n, record_dtype(history_len))
    out["user"] = rng.integers(0, 100_000, n)
    out["pos"] = rng.integers(0, 200, n)
    out["target"] = rng.integers(0, n_items, n)
    # most histories are full (users have many interactions), some are short
    lens = np.where(rng.random(n) < 0.8, history_len, rng.integers(0, history_len + 1, n))
    hist = rng.integers(0, n_items, (n, history_len))
    hist[np.arange(history_len)[None, :] < (history_len - lens)[:, None]] = -1
    out["hist"] = hist
    return out


def per_sample(spec: ShardSpec, recs: np.ndarray) -> bytes:
    """The per-sample train encoder (as `shard_file` wrote train shards before the column-wise one)."""
    lens = (recs["hist"] >= 0).sum(axis=1)
    in_history = (recs["hist"] == recs["target"][:, None]).any(axis=1)
    return tar_members(_members_per_sample(spec, "train", recs, lens, in_history, {"shortcut": 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=50, help="shards timed per encoder and history length")
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    ap.add_argument("--history-len", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--n-items", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3, help="time each shard this many times, keep the best")
    args = ap.parse_args()

    print(f"load average before: {os.getloadavg()}")
    print(f"{'H':>4} {'per-sample/s':>13} {'columns/s':>11} {'speed-up':>9} {'B/sample':>9}")
    for H in args.history_len:
        rng = np.random.default_rng(H)
        spec = ShardSpec(n_items=args.n_items, history_len=H, num_candidates=20, seed=0, negatives="unseen",
                         compression="none")
        shards = [records(rng, args.samples_per_shard, H, args.n_items) for _ in range(args.shards)]
        assert shard_file(spec, "train", shards[0])[0] == per_sample(spec, shards[0])  # and warms Arrow up
        cpu = {"per-sample": 0.0, "columns": 0.0}
        size = 0
        for recs in shards:  # interleaved, so a change in the machine's load hits both alike
            # the best of `repeats` per shard: on a shared VM, CPU time also inflates with contention
            best = {"per-sample": float("inf"), "columns": float("inf")}
            for _ in range(args.repeats):
                t = time.process_time()
                per_sample(spec, recs)
                best["per-sample"] = min(best["per-sample"], time.process_time() - t)
                t = time.process_time()
                data = shard_file(spec, "train", recs)[0]
                best["columns"] = min(best["columns"], time.process_time() - t)
            size += len(data)
            for k in cpu:
                cpu[k] += best[k]
        n = args.shards * args.samples_per_shard
        old, new = n / cpu["per-sample"], n / cpu["columns"]
        print(f"{H:>4} {old:13.0f} {new:11.0f} {new / old:8.1f}x {size / n:9.0f}", flush=True)
    print(f"load average after: {os.getloadavg()} ({os.cpu_count()} CPUs, shared)")


if __name__ == "__main__":
    main()
