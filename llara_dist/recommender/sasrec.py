"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history.

Pre-LayerNorm Transformer blocks with learned absolute positions; the output at the last
position (the most recent item, since histories are left-padded) is the user state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llara_dist.recommender.base import SequentialRecommender


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"rec.hidden_size ({dim}) must be divisible by rec.num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        # SASRec's point-wise feed-forward network: two position-wise linear layers.
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(SequentialRecommender):
    def __init__(self, n_items: int, dim: int, max_len: int, *, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__(n_items, dim)
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=dim**-0.5)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln_f = nn.LayerNorm(dim)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        B, L = seq.shape
        if L > self.max_len:
            raise ValueError(f"history of length {L} exceeds SASRec's max_len {self.max_len}")
        valid = seq != self.pad_id
        x = self.item_embeddings(seq) * self.dim**0.5 + self.positions.weight[self.max_len - L:]
        x = self.drop(x) * valid.unsqueeze(-1)
        # Causal, and never attend to padding keys. A padded query may still attend to itself so
        # that its softmax row is not empty (NaN); its output is never read.
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        mask = (causal & valid[:, None, :]) | eye  # [B, L(query), L(key)]
        mask = mask[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x[:, -1])
