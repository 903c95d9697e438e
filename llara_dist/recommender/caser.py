"""Caser (Tang & Wang, WSDM 2018): the history's embedding matrix read as an image.

Horizontal filters of heights 2, 3, 4 (max-pooled over time) catch union-level sequential
patterns; vertical filters (one weighted sum over positions each) catch point-level ones. As in
LLaRA's Caser, there is no per-user embedding: the model sees only the history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llara_dist.recommender.base import SequentialRecommender


class Caser(SequentialRecommender):
    def __init__(self, n_items: int, dim: int, max_len: int, *, heights: tuple[int, ...] = (2, 3, 4),
                 num_horizontal: int = 16, num_vertical: int = 4, dropout: float = 0.2) -> None:
        super().__init__(n_items, dim)
        self.max_len = max_len
        # A filter taller than the history cannot slide; short-history data sets keep the others.
        self.heights = tuple(h for h in heights if h <= max_len) or (max_len,)
        self.horizontal = nn.ModuleList(nn.Conv2d(1, num_horizontal, (h, dim)) for h in self.heights)
        self.vertical = nn.Conv2d(1, num_vertical, (max_len, 1))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(num_horizontal * len(self.heights) + num_vertical * dim, dim)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        B, L = seq.shape
        if L != self.max_len:
            raise ValueError(f"Caser expects histories padded to {self.max_len}, got length {L}")
        x = self.item_embeddings(seq).unsqueeze(1)  # [B, 1, L, dim]; padding rows are zero
        pooled = [F.relu(conv(x)).squeeze(3).amax(dim=2) for conv in self.horizontal]  # each [B, n_h]
        vertical = self.vertical(x).flatten(1)  # [B, n_v * dim]
        z = self.drop(torch.cat(pooled + [vertical], dim=1))
        return F.relu(self.fc(z))
