"""Rank each sample's stored candidates: by a trained recommender, or by train-split popularity.

HitRatio@1 breaks ties by expectation (a target tied with t others at the top counts 1/(t+1)),
the rule ``eval.metrics`` uses for the LLM, so the numbers compare directly. Popularity ties
often; a fixed tie-break would flatter or punish it by the candidates' stored order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load

from llara_dist.data.storage import ShardDir
from llara_dist.errors import CheckpointError
from llara_dist.recommender.arrays import SplitArrays, load_split, samples_to_arrays
from llara_dist.recommender.base import SequentialRecommender
from llara_dist.recommender.models import build_recommender


def hit_ratio_at_1(scores: np.ndarray, candidates: np.ndarray, targets: np.ndarray) -> float:
    """Mean expected HitRatio@1 over rows; ``scores``/``candidates`` are ``[N, C]``."""
    if len(targets) == 0:
        return float("nan")
    rows = np.arange(len(targets))
    target_idx = np.argmax(candidates == targets[:, None], axis=1)
    s = scores[rows, target_idx][:, None]
    on_top = ~(scores > s).any(axis=1)
    tied = (scores == s).sum(axis=1)  # includes the target itself
    return float(np.mean(on_top / tied))


@torch.no_grad()
def score_arrays(model: SequentialRecommender, seq: np.ndarray, candidates: np.ndarray, *,
                 batch_size: int = 1024) -> np.ndarray:
    """The model's scores of ``candidates [N, C]`` given histories ``seq [N, L]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seq), batch_size):
        s = torch.from_numpy(seq[i:i + batch_size]).to(device)
        c = torch.from_numpy(candidates[i:i + batch_size]).to(device)
        out.append(model.score_items(s, c).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, candidates.shape[1]), np.float32)


def load_recommender(rec_dir: str | Path | ShardDir, device: str = "cpu") -> tuple[SequentialRecommender, dict]:
    """Rebuild the trained recommender of a ``train-rec`` output directory (eval mode); a local
    path or a ``pyarrow.fs`` URI, like the item table beside it."""
    where = ShardDir.of(rec_dir)
    for name in ("rec_meta.json", "model.safetensors"):
        if not where.is_file(name):
            raise CheckpointError(f"{where.where(name)}: not found (expected the output of "
                                  f"`llara-dist train-rec --out {where.label}`)")
    meta = json.loads(where.read("rec_meta.json"))
    arch = meta["architecture"]
    model = build_recommender(meta["model"], meta["n_items"], arch["max_len"], hidden_size=arch["hidden_size"],
                              dropout=arch["dropout"], num_blocks=arch["num_blocks"], num_heads=arch["num_heads"])
    model.load_state_dict(load(where.read("model.safetensors")))
    return model.to(device).eval(), meta


def score_candidates(rec_dir: str | Path, samples: Iterable[dict]) -> np.ndarray:
    """The recommender's scores of each sample's stored candidates: ``[n, C]`` float32."""
    model, meta = load_recommender(rec_dir)
    arrays = samples_to_arrays(samples, meta["n_items"], meta["architecture"]["max_len"],
                               where="score_candidates samples", with_candidates=True)
    return score_arrays(model, arrays.seq, arrays.candidates)


def popularity_counts(train: SplitArrays, n_items: int) -> np.ndarray:
    """How many train users interacted with each item (in histories or targets): ``[n_items]``.

    Distinct users, not occurrences: train samples are overlapping windows of the same sequences,
    so raw occurrence counts would weight long-history users many times over.
    """
    users = np.repeat(train.users + 1, train.seq.shape[1] + 1)  # +1: an unknown user (-1) stays >= 0
    items = np.concatenate([train.seq, train.target[:, None]], axis=1).ravel()
    real = items < n_items  # drop padding
    pairs = np.unique(users[real] * n_items + items[real])
    return np.bincount(pairs % n_items, minlength=n_items).astype(np.float32)


def popularity_scores(shard_dir: str | Path, samples: Iterable[dict]) -> np.ndarray:
    """Each sample's stored candidates scored by train-split popularity: ``[n, C]`` float32."""
    from llara_dist.data.shards import load_meta

    meta = load_meta(shard_dir)
    arrays = samples_to_arrays(samples, meta["n_items"], meta["history_len"],
                               where=f"popularity_scores samples ({shard_dir})", with_candidates=True)
    return popularity_counts(load_split(shard_dir, "train", meta), meta["n_items"])[arrays.candidates]
