"""Object-store item table: private memory each Ray worker adds to read a frozen table.

The driver `ray.put`s the table once; every worker `ray.get`s it and wraps it with
`torch.from_numpy`, exactly as `llara_dist/train/worker.py` does, then touches every page (a sum).
Compared side by side with the alternative the design replaces: each worker reading the table from
its safetensors file. Reports the USS (memory private to the worker process) added per worker.

    python benchmarks/bench_object_store.py --mb 256 --workers 2     # target: <= 5% of the table
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _uss_mb() -> float:
    import psutil

    return psutil.Process().memory_full_info().uss / 2**20


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="table size in MiB")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import ray
    import torch  # noqa: F401  (imported in workers too; load it before measuring)
    from safetensors.numpy import save_file

    rows = args.mb * 2**20 // (4 * args.dim)
    table = np.random.default_rng(0).standard_normal((rows, args.dim), dtype=np.float32)
    size_mb = table.nbytes / 2**20
    tmp = Path(tempfile.mkdtemp(prefix="bench-objstore-"))
    save_file({"item_embeddings": table}, str(tmp / "item_embeddings.safetensors"))

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             object_store_memory=max(int(table.nbytes * 1.5), 300 * 2**20))

    @ray.remote(num_cpus=0)
    class Reader:
        def __init__(self):
            import torch  # noqa: F401  (so the import is not counted below)
            from safetensors.numpy import load_file  # noqa: F401

        def read(self, how: str, ref_box: list, path: str) -> dict:
            import torch

            before_uss, before_rss = _uss_mb(), _rss_mb()
            t0 = time.perf_counter()
            if how == "object store":
                arr = ray.get(ref_box[0])
            else:
                from safetensors.numpy import load_file

                arr = load_file(path)["item_embeddings"]
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tensor = torch.from_numpy(arr)
            checksum = float(tensor.sum())  # touch every page
            seconds = time.perf_counter() - t0
            self._keep = tensor  # hold it, as a training worker does
            return {"uss": _uss_mb() - before_uss, "rss": _rss_mb() - before_rss, "s": seconds, "sum": checksum}

    ref = ray.put(table)  # once, on the driver
    del table
    results = {}
    for how in ("object store", "file per worker"):
        readers = [Reader.remote() for _ in range(args.workers)]
        out = ray.get([r.read.remote(how, [ref], str(tmp / "item_embeddings.safetensors")) for r in readers])
        results[how] = out
        for r in readers:
            ray.kill(r)
    ray.shutdown()

    print(f"\nitem table {size_mb:.0f} MiB ({rows} x {args.dim} float32), {args.workers} workers\n")
    print(f"| read path | USS added / worker (MiB) | % of table | RSS added / worker (MiB) | read s |")
    print("|---|---|---|---|---|")
    for how, out in results.items():
        uss = max(o["uss"] for o in out)
        rss = max(o["rss"] for o in out)
        secs = max(o["s"] for o in out)
        print(f"| {how} | {uss:.1f} | {100 * uss / size_mb:.1f}% | {rss:.0f} | {secs:.2f} |")
    ratio = max(o["uss"] for o in results["object store"]) / size_mb
    print(f"\nobject store: {100 * ratio:.2f}% of the table per worker (target <= 5%): "
          f"{'PASS' if ratio <= 0.05 else 'FAIL'}")
    assert len({round(o['sum'], 3) for outs in results.values() for o in outs}) == 1, "workers read different tables"


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
