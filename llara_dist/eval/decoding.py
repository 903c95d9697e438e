"""Evaluation's decoding pieces: the candidate-title trie and candidate scoring.

Free and constrained decoding are greedy (``LlaraModel.generate``, whose loop is
``llara_dist.model.generation.greedy_generate``); the constrained one passes a
:class:`CandidateTrie` per row as its constraint. Score decoding ranks the candidates by
:func:`continuation_logprobs`, which drives the Hugging Face causal LM (PEFT-wrapped or not)
directly from the prompt's ``inputs_embeds`` (item embeddings already injected by
``LlaraModel.embed``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_END = -1  # key of the trie node reached after a complete sequence


class CandidateTrie:
    """Prefix tree over token sequences (each a candidate title's tokens followed by EOS).

    ``allowed(prefix)`` lists the tokens that keep ``prefix`` on some sequence; titles that share
    leading tokens share nodes, and a title that is a prefix of another ("Toy Story" / "Toy Story
    2") is allowed to stop (EOS) or go on.
    """

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("CandidateTrie needs at least one sequence")
        self.root: dict = {}
        for seq in sequences:
            if not seq:
                raise ValueError("CandidateTrie: empty token sequence (a candidate title tokenised to nothing?)")
            node = self.root
            for tok in seq:
                node = node.setdefault(int(tok), {})
            node[_END] = {}

    def node(self, prefix: Sequence[int]) -> dict | None:
        node = self.root
        for tok in prefix:
            node = node.get(int(tok))
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = self.node(prefix)
        return sorted(k for k in node if k != _END) if node else []

    def complete(self, prefix: Sequence[int]) -> bool:
        node = self.node(prefix)
        return node is not None and _END in node


def _pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [N, T]`` (long) and ``mask [N, T]`` (bool, True on real tokens)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_logprobs(
    lm: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    length_norm: bool = False,
) -> np.ndarray:
    """Log-likelihood of each token sequence (e.g. a candidate title's tokens + EOS) as the
    continuation of one prompt: the one scorer of llara-dist.

    ``prompt_embeds [L, D]`` is a single unpadded prompt. It is run once, and its KV cache is
    shared by all candidates: the second forward covers only the ``[C, T]`` candidate tokens
    (right-padded). The prompt dominates the cost (hundreds of tokens against a title's few), so
    this is ~C times cheaper than running prompt + candidate per row. Returns ``[C]`` float64: the
    sum of the candidates' token log-probabilities (the mean when ``length_norm``).
    """
    device = prompt_embeds.device
    n, plen = len(sequences), prompt_embeds.shape[0]
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise ValueError("continuation_logprobs: needs at least one sequence, and no empty one")
    ids, tok_mask = _pad_right(sequences, pad_id, device)
    tmax = ids.shape[1]
    # 1. The prompt, once: its last logit predicts every candidate's first token.
    out = lm(inputs_embeds=prompt_embeds.unsqueeze(0), attention_mask=torch.ones(1, plen, dtype=torch.long, device=device),
             position_ids=torch.arange(plen, device=device).unsqueeze(0), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)[ids[:, 0]]
    # 2. The candidates over the shared cache: the logit at candidate position j predicts token j+1.
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    cont = lm.get_input_embeddings()(ids).to(prompt_embeds.dtype)
    attn = torch.cat([torch.ones(n, plen, dtype=torch.long, device=device), tok_mask.long()], dim=1)
    positions = (plen + torch.arange(tmax, device=device)).unsqueeze(0).expand(n, -1)
    tok_logp = torch.zeros(n, tmax, dtype=torch.float32, device=device)
    tok_logp[:, 0] = first
    if tmax > 1:
        logits = lm(inputs_embeds=cont[:, :-1], attention_mask=attn[:, :-1], position_ids=positions[:, :-1],
                    past_key_values=cache, use_cache=True).logits
        tok_logp[:, 1:] = logits.float().log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    tok_logp = tok_logp * tok_mask
    total = tok_logp.sum(-1).double()
    if length_norm:
        total = total / tok_mask.sum(-1).double()
    return total.cpu().numpy()
