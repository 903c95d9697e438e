"""MovieLens-100K: SASRec, GRU4Rec and Caser against popularity, on the stored test candidates.

Prepares the shards with `llara-dist prepare --format recbole` (leave-last-out, history 10,
20 candidates = target + 19 seeded negatives, 943 test users), trains each recommender with
`run_train_rec` (early stopping on valid HitRatio@1) and prints one Markdown table: HR@1 on the
valid and test users, epochs run (best epoch), and training seconds, measured in this one run.

    python benchmarks/rec_ml100k.py                     # all three, ../shared/data/ml-100k
    python benchmarks/rec_ml100k.py --models sasrec --threads 2

Not part of the test suite (it needs ../shared/data and minutes of CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from llara_dist.config import load_config
from llara_dist.data.prepare import run_prepare
from llara_dist.recommender.train import format_table, run_train_rec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "ml-100k"),
                    help="RecBole atomic ML-100K directory")
    ap.add_argument("--work", help="where shards and models go (default: a temporary directory)")
    ap.add_argument("--models", nargs="+", default=["sasrec", "gru4rec", "caser"])
    ap.add_argument("--epochs", type=int, default=10, help="at most this many epochs per model")
    ap.add_argument("--patience", type=int, default=3, help="stop after this many epochs without valid gain")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides, e.g. rec.dropout=0.3")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.work or tempfile.mkdtemp(prefix="rec_ml100k-"))
    shards = work / "shards"
    if not (shards / "meta.json").is_file():
        run_prepare(load_config(None, ["prepare.format=recbole", f"prepare.input={args.input}", f"prepare.out={shards}",
                                       "prepare.history_len=10", "prepare.num_candidates=20", "prepare.seed=0"]))

    rows, results = [], {}
    popularity = None
    for name in args.models:
        cfg = load_config(None, [f"data.shards={shards}", f"rec.model={name}", f"rec.out={work / name}",
                                 f"rec.epochs={args.epochs}", f"rec.patience={args.patience}", f"rec.seed={args.seed}",
                                 *args.overrides])
        start = time.perf_counter()
        m = run_train_rec(cfg)
        wall = time.perf_counter() - start
        results[name] = {**m, "wall_seconds": wall}
        popularity = m["popularity"]
        rows.append({"model": name, "valid": m["valid"]["hr@1"], "test": m["test"]["hr@1"], "n_test": m["test"]["n"],
                     "epochs": f"{m['epochs_run']} ({m['best_epoch']})", "seconds": m["train_seconds"],
                     "cpu_seconds": m["train_cpu_seconds"]})
    if popularity is not None:
        rows.append({"model": "popularity", "valid": popularity["valid"]["hr@1"], "test": popularity["test"]["hr@1"],
                     "n_test": rows[0]["n_test"], "epochs": "-", "seconds": 0.0, "cpu_seconds": 0.0})
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print()
    print(f"ML-100K, HitRatio@1 on 20 stored candidates; {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPUs usable, torch threads {torch.get_num_threads()}, "
          f"device {next(iter(results.values()))['device'] if results else '-'}")
    print(format_table(rows))
    print("load average (1/5/15 min) at the end: " + "/".join(f"{x:.1f}" for x in os.getloadavg())
          + " (wall time grows with other work on the cores; CPU time is this process's own)")
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
