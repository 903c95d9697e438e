"""`llara-dist prepare` at scale: wall, CPU time, samples/s and peak RSS per number of interactions.

Generates N interactions (200 per user, Zipf-popular items) as RecBole atomic files and as Parquet,
then runs `prepare` on each in a fresh child process (so peak RSS is the run's own, read from
``wait4``) with the local engine, and optionally with the Ray Data engine::

    python benchmarks/bench_prepare.py --n 1M 4M 20M --ray-at 4M --workers 2 --keep-data /tmp/bp
    python benchmarks/bench_prepare.py --n 1M --compression gzip   # bytes/sample of .tar.gz shards

CPU s is user+system time of the child and everything it waited for (pool workers included; Ray's
own worker processes are not children and are not counted). Report which machine and how busy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

PER_USER = 200


def parse_n(text: str) -> int:
    text = text.upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def generate(n: int, directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """(recbole dir, parquet file) holding n interactions: n/200 users, Zipf(1.1) over n/100 items."""
    rng = np.random.default_rng(seed)
    users = max(1, n // PER_USER)
    n_items = max(1000, min(200_000, n // 100))
    p = 1.0 / np.arange(1, n_items + 1) ** 1.1
    p /= p.sum()
    rb, parquet = directory / f"rb-{n}", directory / f"log-{n}.parquet"
    if rb.is_dir() and parquet.is_file():
        return rb, parquet
    rb.mkdir(parents=True, exist_ok=True)
    titles = np.array([f"Item {i}" for i in range(n_items)], dtype=object)
    # Arrow quotes header names whatever the quoting style: the headers are written by hand.
    (rb / "bench.item").write_text("item_id:token\ttitle:token_seq\n")
    (rb / "bench.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    with open(rb / "bench.item", "ab") as f:
        pacsv.write_csv(pa.table({"i": np.arange(n_items), "t": titles}), f,
                        pacsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False))
    pq_writer = None
    chunk_users = 20_000  # generate and write in chunks: the generator stays small too
    for u0 in range(0, users, chunk_users):
        u1 = min(users, u0 + chunk_users)
        k = (u1 - u0) * PER_USER
        user = np.repeat(np.arange(u0, u1), PER_USER)
        item = rng.choice(n_items, size=k, p=p)
        ts = np.tile(np.arange(PER_USER), u1 - u0) + 1_000_000
        with open(rb / "bench.inter", "ab") as f:
            pacsv.write_csv(pa.table({"u": user, "i": item, "t": ts}), f,
                            pacsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False))
        t_pq = pa.table({"user_id": user, "item_id": item, "timestamp": ts.astype(np.float64),
                         "title": pa.array(titles[item].tolist()).dictionary_encode()})
        if pq_writer is None:
            pq_writer = pq.ParquetWriter(parquet, t_pq.schema)
        pq_writer.write_table(t_pq)
    pq_writer.close()
    return rb, parquet


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run a child; its wall time, CPU time and peak RSS (from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_b, err_b = proc.communicate()
    wall = time.perf_counter() - t0
    # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN deltas, so measure per run
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err_b.decode()[-3000:]}")
    return {"wall": wall, "stdout": out_b.decode()}


def measure(fmt: str, src: Path, out: Path, engine: str, workers: int, compression: str) -> dict:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = (
        "import resource, sys;"
        "from llara_dist.config import load_config;"
        "from llara_dist.data.prepare import run_prepare;"
        f"run_prepare(load_config(None, ['prepare.format={fmt}', 'prepare.input={src}', 'prepare.out={out}',"
        f"'prepare.engine={engine}', 'prepare.workers={workers}', 'prepare.compression={compression}']));"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report this
        # benchmark's own RSS (the generated logs) whenever that is larger
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
        "print('MAXRSS_KB', hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    res = run_child([sys.executable, "-c", code])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("MAXRSS_KB")][-1].split()
    meta = json.loads((out / "meta.json").read_text())
    samples = sum(meta["counts"].values())
    shard_bytes = sum((out / e["name"]).stat().st_size for v in meta["shards"].values() for e in v)
    return {"wall_s": res["wall"], "cpu_s": cpu, "samples": samples, "samples_per_s": samples / res["wall"],
            "peak_rss_gb": int(line[1]) / 1e6, "worker_peak_rss_gb": int(line[2]) / 1e6,
            "bytes_per_sample": shard_bytes / samples, "fingerprint": meta["fingerprint"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", nargs="+", default=["1M", "4M", "20M"], help="interaction counts (1M, 4M, 20M)")
    ap.add_argument("--formats", nargs="+", default=["recbole", "parquet"], choices=["recbole", "parquet"])
    ap.add_argument("--ray-at", nargs="*", default=["4M"], help="also run the Ray Data engine at these N")
    ap.add_argument("--workers", type=int, default=2, help="local engine: shard-writing processes")
    ap.add_argument("--compression", default="none", choices=["none", "gzip"])
    ap.add_argument("--keep-data", help="directory for the generated logs (reused between runs)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    data_dir = Path(args.keep_data or tempfile.mkdtemp(prefix="bench_prepare_"))
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'N':>6} {'format':>8} {'engine':>6} {'wall s':>8} {'CPU s':>8} {'samples/s':>10} "
          f"{'peak RSS GB':>11} {'B/sample':>9}")
    for n_text in args.n:
        n = parse_n(n_text)
        t0 = time.perf_counter()
        rb, parquet = generate(n, data_dir)
        gen = time.perf_counter() - t0
        runs = [(fmt, "local") for fmt in args.formats]
        if n_text in args.ray_at:
            runs.append(("parquet" if "parquet" in args.formats else args.formats[0], "ray"))
        for fmt, engine in runs:
            out = Path(tempfile.mkdtemp(prefix=f"bp-out-{n}-", dir=data_dir))
            r = measure(fmt, rb if fmt == "recbole" else parquet, out, engine, args.workers, args.compression)
            shutil.rmtree(out)
            row = {"n": n, "format": fmt, "engine": engine, "workers": args.workers,
                   "compression": args.compression, "generate_s": gen, **r}
            rows.append(row)
            print(f"{n_text:>6} {fmt:>8} {engine:>6} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['samples_per_s']:10.0f} "
                  f"{max(r['peak_rss_gb'], r['worker_peak_rss_gb']):11.2f} {r['bytes_per_sample']:9.0f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.keep_data:
        shutil.rmtree(data_dir)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
