"""MovieLens-100K end to end: LLaRA variants vs SASRec vs popularity under three decodings.

One run: prepare the RecBole files (leave-last-out, 10 history items, 20 stored candidates, 943
test users) -> SASRec -> a warm tiny base (`llara-dist pretrain-base`: all parameters trained as a
causal LM on the train split's text-only prompts + answers, the CPU stand-in for a pretrained LLM;
`--warm-base-steps 0` keeps the random tiny base) -> for each LLaRA variant (text-only, hybrid with the linear curriculum,
hybrid-only) `llara-dist train` with Ray workers and DeepSpeed ZeRO-3 -> `llara-dist eval` with
free, constrained and score decoding. Prints one Markdown table: HitRatio@1 with Wilson 95%
intervals (and ValidRatio for free decoding, HR@5 / NDCG@10 for score decoding), all measured on
the same test users and candidates in this one run. Two diagnostics come with it: each hybrid
model is also score-decoded with the item table's rows shuffled (does the LLM use the injected
embeddings?), and a reference row ranks the candidates by their dot product with the mean history
embedding (how much the frozen table alone carries).

    python benchmarks/quality_ml100k.py                          # the full run (< 60 min on 2 cores)
    python benchmarks/quality_ml100k.py --steps 20 --users 50    # a smoke run (minutes)
    python benchmarks/quality_ml100k.py --seeds 0 1              # two training seeds per variant

Any dotted config override goes at the end (e.g. model.tiny.hidden_size=128). Not part of the test
suite: it needs ../shared/data/ml-100k and most of an hour of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# table name -> (train.curriculum, prompt form used at evaluation)
VARIANTS = {
    "text-only": ("text_only", "text"),
    "hybrid-curriculum": ("linear", "hybrid"),
    "hybrid-only": ("hybrid_only", "hybrid"),
}
DECODINGS = ("free", "constrained", "score")


def _ci(m: dict) -> str:
    lo, hi = m["hit_ratio@1_ci95"]
    return f"{m['hit_ratio@1']:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(rows: list[dict]) -> str:
    head = ["model", "seed", "free HR@1 [95% CI]", "free ValidRatio", "constrained HR@1 [95% CI]",
            "score HR@1 [95% CI]", "score HR@5", "score NDCG@10", "score HR@1, table rows shuffled", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        free, cons, score = r["free"], r["constrained"], r["score"]
        cells = [r["model"], str(r.get("seed", "-")), _ci(free),
                 f"{free['valid_ratio']:.3f}" if "valid_ratio" in free else "-", _ci(cons), _ci(score),
                 f"{score['hit_ratio@5']:.3f}", f"{score['ndcg@10']:.3f}",
                 _ci(r["shuffled"]) if r.get("shuffled") else "-",
                 f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shuffled_table(rec: Path, work: Path, seed: int = 0) -> Path:
    """A copy of the recommender directory whose item-table rows are permuted (padding row kept).

    Score decoding of a hybrid model with this table is the ablation that says whether the LLM
    uses the injected embeddings at all: if it does, wrong embeddings must cost HitRatio@1."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from llara_dist.recommender.table import TABLE_FILE, TABLE_KEY, save_item_table

    out = work / "rec-shuffled-table"
    if not (out / TABLE_FILE).is_file():
        shutil.copytree(rec, out, dirs_exist_ok=True)
        table = load_file(str(rec / TABLE_FILE))[TABLE_KEY]
        n = table.shape[0] - 1
        table[:n] = table[np.random.default_rng(seed).permutation(n)]
        save_item_table(out, table)
    return out


def embedding_readout(shards: Path, rec: Path, n_users: int | None) -> dict:
    """The frozen table's signal without any sequence model: each candidate scored by its dot
    product with the mean embedding of the 10 history items (what one attention read-out over the
    injected placeholders could compute). A reference for how much the injected embeddings carry."""
    import numpy as np

    from llara_dist.data.shards import load_meta, read_split
    from llara_dist.eval.metrics import ranking_metrics
    from llara_dist.recommender.table import load_item_table

    table, _ = load_item_table(rec, load_meta(shards))
    samples = list(read_split(shards, "test"))[:n_users]
    scores = [table[s["candidates"]] @ table[s["history"]].mean(0) for s in samples]
    return ranking_metrics(scores, [list(s["candidates"]).index(s["target"]) for s in samples])


def _previous_eval(cfg, run_dir: Path, train_s: float | None) -> dict | None:
    """The metrics of an identical earlier evaluation of a reused run (so a rerun resumes)."""
    from llara_dist.data.shards import load_meta
    from llara_dist.eval.evaluate import default_out_dir

    path = default_out_dir(run_dir, cfg) / "metrics.json"
    if train_s is not None or not path.is_file():
        return None
    m = json.loads(path.read_text())
    n = load_meta(cfg.data.shards)["counts"][cfg.eval.split]
    if cfg.eval.max_samples:
        n = min(n, cfg.eval.max_samples)
    return m if m.get("decoding") == cfg.eval.decoding and m.get("n") == n else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "ml-100k"),
                    help="RecBole atomic ML-100K directory")
    ap.add_argument("--work", help="where shards, models and runs go (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps per LLaRA variant (~8 min on 2 cores)")
    # One worker with every core: on 2 shared cores, two ZeRO-3 ranks spend most of a tiny model's
    # step in gloo collectives (0.6-1.3 s/step measured, against ~0.15 s for one rank).
    ap.add_argument("--workers", type=int, default=1, help="Ray workers for training and evaluation")
    ap.add_argument("--cpus-per-worker", type=int, default=None,
                    help="CPUs (torch threads) per Ray worker (default: all CPUs / workers)")
    ap.add_argument("--users", type=int, default=None, help="evaluate only the first N test users (smoke runs)")
    ap.add_argument("--rec-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (SASRec); 1 is faster on shared cores")
    ap.add_argument("--warm-base-steps", type=int, default=2000,
                    help="pretrain-base steps before LoRA training (0: the random-init tiny base)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides for training and evaluation")
    args = ap.parse_args()
    cpus = args.cpus_per_worker or max(1, (os.cpu_count() or 1) // args.workers)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from llara_dist.config import load_config
    from llara_dist.data.prepare import run_prepare
    from llara_dist.eval.evaluate import run_eval
    from llara_dist.model.warm_base import pretrain_base
    from llara_dist.recommender.train import run_train_rec
    from llara_dist.train.driver import run_train

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="quality_ml100k-")).resolve()
    shards, rec = work / "shards", work / "rec"
    if not (shards / "meta.json").is_file():
        run_prepare(load_config(None, ["prepare.format=recbole", f"prepare.input={args.input}", f"prepare.out={shards}",
                                       "prepare.history_len=10", "prepare.num_candidates=20", "prepare.seed=0",
                                       "prepare.domain=movie"]))
    if not (rec / "item_embeddings.safetensors").is_file():
        run_train_rec(load_config(None, [f"data.shards={shards}", "rec.model=sasrec", f"rec.out={rec}",
                                         f"rec.epochs={args.rec_epochs}", "rec.patience=3"]))

    # The warm base: every LLaRA variant below starts from the same checkpoint.
    warm = work / f"warm_base-{args.warm_base_steps}"
    base_overrides = []
    if args.warm_base_steps > 0:
        if not (warm / "config.json").is_file():
            summary = pretrain_base(load_config(ROOT / "configs" / "tiny.yaml", [
                f"data.shards={shards}", "data.max_length=1024", f"pretrain.out={warm}",
                f"pretrain.steps={args.warm_base_steps}", *args.overrides]))
            print(f"warm base: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} in {summary['seconds']:.0f} s")
        base_overrides = [f"model.name_or_path={warm}"]

    # Each train/eval starts (and stops) its own local Ray session: with Ray 2.60 a second
    # TorchTrainer.fit in one session lost its workers ("placement group was removed").

    def config(run_dir: Path, extra: list[str]):
        return load_config(ROOT / "configs" / "tiny.yaml", [
            f"data.shards={shards}", f"train.rec_dir={rec}", f"run_dir={run_dir}", "data.max_length=1024",
            f"train.max_steps={args.steps}", "train.epochs=100", f"train.checkpoint_every={max(args.steps, 1)}",
            f"train.log_every={max(1, args.steps // 20)}", f"scaling.num_workers={args.workers}",
            f"eval.num_workers={args.workers}", f"scaling.resources_per_worker.CPU={cpus}",
            "eval.batch_size=8", "eval.max_new_tokens=48",
            *([f"eval.max_samples={args.users}"] if args.users else []), *base_overrides, *extra, *args.overrides])

    rows, baselines, results = [], None, {}
    # Training seconds of runs reused from an earlier invocation in --work (shown, not re-measured).
    earlier = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    for name in args.variants:
        curriculum, prompt = VARIANTS[name]
        for seed in args.seeds:
            run_dir = work / (f"{name}-seed{seed}" + (f"-warm{args.warm_base_steps}" if base_overrides else ""))
            cfg = config(run_dir, [f"train.curriculum={curriculum}", f"train.seed={seed}", f"eval.prompt={prompt}"])
            train_s = None  # None: a finished run in --work was reused
            if not (run_dir / "final" / "llara_config.json").is_file():
                t0 = time.perf_counter()
                run_train(cfg)
                train_s = time.perf_counter() - t0
            shown_s = train_s if train_s is not None else earlier.get(f"{name}-seed{seed}", {}).get("train_seconds")
            row = {"model": name, "seed": seed, "train_seconds": shown_s}
            for decoding in DECODINGS:
                ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"decoding": decoding})})
                m = _previous_eval(ecfg, run_dir, train_s) or run_eval(ecfg, run_dir=run_dir)
                row[decoding] = m
                baselines = baselines or m
            if prompt == "hybrid":  # the ablation: same model, item table rows shuffled
                scfg = cfg.model_copy(update={
                    "eval": cfg.eval.model_copy(update={"decoding": "score"}),
                    "train": cfg.train.model_copy(update={"rec_dir": str(shuffled_table(rec, work))})})
                out = run_dir / "eval" / "test-score-shuffled-table"
                done = out / "metrics.json"
                row["shuffled"] = (json.loads(done.read_text()) if done.is_file() and train_s is None
                                   else run_eval(scfg, run_dir=run_dir, out_dir=out))
            rows.append(row)
            results[f"{name}-seed{seed}"] = {d: row[d] for d in (*DECODINGS, "shuffled") if d in row} | {
                "train_seconds": shown_s}

    # The recommender and popularity rank the very same candidates; their HR@1 does not depend on
    # how the LLM decodes, so one set of numbers fills all three columns.
    refs = [("SASRec", baselines["recommender"]), ("popularity", baselines["popularity"]),
            ("SASRec table read-out (mean history . candidate)", embedding_readout(shards, rec, args.users))]
    for label, ref in refs:
        rows.append({"model": label, "free": ref, "constrained": ref, "score": ref, "train_seconds": None})
    results["references"] = {label: ref for label, ref in refs}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(rows)
    (work / "table.md").write_text(table + "\n")

    n = baselines["n"]
    print()
    print(f"ML-100K test users: {n}; {args.steps} steps per variant, {args.workers} Ray worker(s) x {cpus} CPUs, "
          f"tiny Llama, warm-base steps {args.warm_base_steps} ({os.cpu_count()} CPUs); total {time.perf_counter() - t_start:.0f} s")
    print(table)
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
