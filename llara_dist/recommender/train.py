"""`llara-dist train-rec`: fit a sequential recommender on the shards, pick the epoch by valid
HitRatio@1, score the test split's stored candidates, export the frozen item table.

Objective: full-catalogue softmax cross-entropy on the next item (``rec.loss: ce``, default).
Every other item is a negative in every step, which learns a much sharper table than one sampled
negative per positive and costs one ``[B, d] x [d, n_items]`` matmul, cheap for catalogues of
the sizes LLaRA works with. ``rec.loss: bce`` (SASRec's original one-negative BCE) is there for
very large catalogues and for comparison.

Outputs in ``rec.out`` (plain formats, no pickled modules):
``item_embeddings.safetensors`` (the table, ``[n_items + 1, d]``, row ``n_items`` = padding),
``model.safetensors`` (all weights, for scoring), ``rec_meta.json``, ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from llara_dist.config import Config, RecConfig
from llara_dist.errors import ConfigError
from llara_dist.recommender.arrays import SplitArrays, load_split
from llara_dist.recommender.base import SequentialRecommender
from llara_dist.recommender.models import architecture, build_recommender
from llara_dist.recommender.scoring import hit_ratio_at_1, popularity_counts, score_arrays
from llara_dist.recommender.table import META_FILE, save_item_table


def resolve_device(device: str) -> torch.device:
    """``rec.device``: ``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"rec.device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"rec.device: {device!r} requested but this torch build sees no CUDA device "
                          f"(use rec.device=auto or cpu)")
    return dev


def _loss(model: SequentialRecommender, seq: torch.Tensor, target: torch.Tensor, kind: str,
          gen: torch.Generator) -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(model(seq), target)
    # BCE with one uniformly sampled negative per positive (never the positive itself).
    offset = torch.randint(1, model.n_items, target.shape, generator=gen).to(target.device)
    negative = (target + offset) % model.n_items
    logits = model.score_items(seq, torch.stack([target, negative], dim=1))
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


def fit(model: SequentialRecommender, train: SplitArrays, valid: SplitArrays, rc: RecConfig,
        device: torch.device, *, progress: bool = True) -> dict[str, Any]:
    """Train with early stopping on valid HitRatio@1; leaves ``model`` at its best epoch.

    Returns ``{"best_epoch", "epochs_run", "valid_hr1_history", "loss_history", "seconds", "cpu_seconds"}``
    (``cpu_seconds``: this process's CPU time, which on shared cores says more than wall time).
    """
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)  # L2 decay
    gen = torch.Generator().manual_seed(rc.seed)  # batch order and BCE negatives
    seq_all, tgt_all = torch.from_numpy(train.seq), torch.from_numpy(train.target)
    n = len(train)
    best_hr, best_epoch, best_state = -1.0, 0, None
    valid_hist, loss_hist = [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(1, rc.epochs + 1):
        order = torch.randperm(n, generator=gen)
        total, steps = 0.0, 0
        bar = tqdm(range(0, n, rc.batch_size), desc=f"{type(model).__name__} epoch {epoch}", leave=False,
                   disable=not progress, unit="batch", mininterval=2.0)
        for i in bar:
            idx = order[i:i + rc.batch_size]
            loss = _loss(model, seq_all[idx].to(device), tgt_all[idx].to(device), rc.loss, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        hr = hit_ratio_at_1(score_arrays(model, valid.seq, valid.candidates), valid.candidates, valid.target)
        valid_hist.append(hr)
        loss_hist.append(total / max(steps, 1))
        improved = hr > best_hr
        if improved:
            best_hr, best_epoch = hr, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress:
            tqdm.write(f"epoch {epoch:3d}  loss {loss_hist[-1]:.4f}  valid HR@1 {hr:.4f}" + ("  *" if improved else ""))
        if epoch - best_epoch >= rc.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best_epoch, "epochs_run": len(valid_hist), "valid_hr1_history": valid_hist,
            "loss_history": loss_hist, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


def evaluate(model: SequentialRecommender, split: SplitArrays) -> float:
    return hit_ratio_at_1(score_arrays(model, split.seq, split.candidates), split.candidates, split.target)


def popularity_hr1(counts: np.ndarray, split: SplitArrays) -> float:
    return hit_ratio_at_1(counts[split.candidates], split.candidates, split.target)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``{"model", "valid", "test", "n_test", "epochs", "seconds", "cpu_seconds"}`` as Markdown."""
    lines = ["| model | valid HR@1 | test HR@1 | test samples | epochs (best) | train s (wall) | train s (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['valid']:.4f} | {r['test']:.4f} | {r['n_test']} | {r['epochs']} | "
                     f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def run_train_rec(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.rec.model`` on ``cfg.data.shards``, write ``cfg.rec.out``, return the metrics."""
    from llara_dist.data.shards import load_meta

    rc, shard_dir, out = cfg.rec, Path(cfg.data.shards), Path(cfg.rec.out)
    device = resolve_device(rc.device)  # a bad device fails before any data is read
    meta = load_meta(shard_dir)
    n_items, max_len = int(meta["n_items"]), int(meta["history_len"])
    train, valid, test = (load_split(shard_dir, s, meta) for s in ("train", "valid", "test"))

    torch.manual_seed(rc.seed)  # initialisation and dropout
    arch = architecture(rc, max_len)
    model = build_recommender(rc.model, n_items, max_len, hidden_size=arch["hidden_size"], dropout=arch["dropout"],
                              num_blocks=arch["num_blocks"], num_heads=arch["num_heads"])
    history = fit(model, train, valid, rc, device, progress=progress)

    counts = popularity_counts(train, n_items)
    metrics = {
        "model": rc.model,
        "valid": {"hr@1": evaluate(model, valid), "n": len(valid)},
        "test": {"hr@1": evaluate(model, test), "n": len(test)},
        "popularity": {"valid": {"hr@1": popularity_hr1(counts, valid)}, "test": {"hr@1": popularity_hr1(counts, test)}},
        "best_epoch": history["best_epoch"],
        "epochs_run": history["epochs_run"],
        "train_seconds": history["seconds"],
        "train_cpu_seconds": history["cpu_seconds"],
        "device": str(device),
        "valid_hr1_history": history["valid_hr1_history"],
        "loss_history": history["loss_history"],
    }

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    save_item_table(out, state["item_embeddings.weight"].numpy())
    rec_meta = {
        "model": rc.model,
        "dim": rc.hidden_size,
        "n_items": n_items,
        "shards_fingerprint": meta["fingerprint"],
        "shards": str(shard_dir),
        "seed": rc.seed,
        "loss": rc.loss,
        "architecture": arch,
        "metrics": {k: metrics[k] for k in ("valid", "test", "popularity", "best_epoch", "epochs_run")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # rec_meta.json last: its presence means the directory is complete.
    (out / META_FILE).write_text(json.dumps(rec_meta, indent=2))

    if progress:
        print(format_table([
            {"model": rc.model, "valid": metrics["valid"]["hr@1"], "test": metrics["test"]["hr@1"], "n_test": len(test),
             "epochs": f"{history['epochs_run']} ({history['best_epoch']})", "seconds": history["seconds"],
             "cpu_seconds": history["cpu_seconds"]},
            {"model": "popularity", "valid": metrics["popularity"]["valid"]["hr@1"],
             "test": metrics["popularity"]["test"]["hr@1"], "n_test": len(test), "epochs": "-", "seconds": 0.0,
             "cpu_seconds": 0.0},
        ]))
        print(f"wrote {out}/{{item_embeddings,model}}.safetensors, {META_FILE}, metrics.json")
    return metrics
