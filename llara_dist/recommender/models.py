"""Name -> model: the one place that knows how each recommender is built from its settings."""

from __future__ import annotations

from typing import Any

from llara_dist.recommender.base import SequentialRecommender
from llara_dist.recommender.caser import Caser
from llara_dist.recommender.gru4rec import GRU4Rec
from llara_dist.recommender.sasrec import SASRec

MODEL_NAMES = ("sasrec", "gru4rec", "caser")


def build_recommender(name: str, n_items: int, max_len: int, *, hidden_size: int, dropout: float,
                      num_blocks: int = 2, num_heads: int = 1) -> SequentialRecommender:
    """Build a freshly initialised recommender; ``max_len`` is the shards' history length."""
    if name == "sasrec":
        return SASRec(n_items, hidden_size, max_len, num_blocks=num_blocks, num_heads=num_heads, dropout=dropout)
    if name == "gru4rec":
        return GRU4Rec(n_items, hidden_size, dropout=dropout)
    if name == "caser":
        return Caser(n_items, hidden_size, max_len, dropout=dropout)
    raise ValueError(f"unknown recommender {name!r} (expected one of {', '.join(MODEL_NAMES)})")


def architecture(rec_cfg: Any, max_len: int) -> dict[str, Any]:
    """The settings that rebuild the same architecture, as stored in ``rec_meta.json``."""
    return {"hidden_size": rec_cfg.hidden_size, "dropout": rec_cfg.dropout, "num_blocks": rec_cfg.num_blocks,
            "num_heads": rec_cfg.num_heads, "max_len": max_len}
