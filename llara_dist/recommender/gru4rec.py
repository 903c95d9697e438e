"""GRU4Rec (Hidasi et al., ICLR 2016) in its common sequential form: one GRU over the history.

The final hidden state after the last real item, projected back to the item space, is the user
state (as in RecBole's GRU4Rec).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from llara_dist.recommender.base import SequentialRecommender


class GRU4Rec(SequentialRecommender):
    def __init__(self, n_items: int, dim: int, *, dropout: float = 0.2) -> None:
        super().__init__(n_items, dim)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=1, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        B, L = seq.shape
        lengths = (seq != self.pad_id).sum(1)
        # Histories are left-padded; the GRU must not run over the padding, so rotate each row
        # to start with its first real item and pack by length.
        shift = (torch.arange(L, device=seq.device)[None, :] + (L - lengths)[:, None]) % L
        right_padded = seq.gather(1, shift)
        x = self.drop(self.item_embeddings(right_padded))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # h: [num_layers, B, dim], the state after each row's last item
        return self.out(h[-1])
