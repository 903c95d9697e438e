"""What every sequential recommender here shares: the item table, left-padded input, tied scoring.

Input histories are left-padded to the shards' ``history_len`` with the padding id ``n_items``, so
the last position is always the most recent item. Each model encodes a history into one vector
``h`` and scores item ``i`` as ``h . E[i]`` with the *same* table ``E`` it reads items from
(tied weights). Tying is what makes ``E`` worth freezing and injecting into an LLM: an item's row
lives in the space the recommender uses to predict it.
"""

from __future__ import annotations

import torch
from torch import nn


class SequentialRecommender(nn.Module):
    """Base class: ``item_embeddings`` is ``[n_items + 1, dim]``, row ``n_items`` is padding."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.dim = dim
        self.pad_id = n_items
        # padding_idx keeps the padding row at zero and out of the gradient.
        self.item_embeddings = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        nn.init.normal_(self.item_embeddings.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embeddings.weight[n_items].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq [B, L]`` left-padded item ids -> user state ``[B, dim]``."""
        raise NotImplementedError

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (padding excluded): ``[B, n_items]``."""
        return self.encode(seq) @ self.item_embeddings.weight[: self.n_items].T

    def score_items(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of chosen items only: ``items [B, C]`` -> ``[B, C]`` (candidate ranking)."""
        h = self.encode(seq)
        return torch.einsum("bd,bcd->bc", h, self.item_embeddings(items))
