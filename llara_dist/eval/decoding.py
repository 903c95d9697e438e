"""Decoding for evaluation: free greedy, trie-constrained greedy, and candidate scoring.

All three start from ``inputs_embeds`` (the prompt with item embeddings already injected by
``LlaraModel.embed``) and drive a Hugging Face causal LM (PEFT-wrapped or not) directly, because
evaluation needs three things ``generate()`` does not give together: a per-row prefix constraint,
a stop rule that can be synchronised across ranks (under ZeRO-3 every forward is a collective, so
a rank that stops early would leave the others waiting forever), and explicit position ids so a
left-padded row decodes exactly as it would alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_decode(
    lm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    tries: Sequence[CandidateTrie] | None = None,
    all_done: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding from left-padded ``inputs_embeds [B, L, D]``; returns each row's new tokens.

    Rows stop at any of ``stop_ids`` (not included in the result) or after ``max_new_tokens``.
    ``tries`` (one per row) restrict each step to tokens continuing one of the row's sequences;
    a constrained row stops when it emits a token that completes a sequence (EOS).
    ``all_done(local_done) -> bool`` lets distributed callers keep stepping (with finished rows fed
    padding) until every rank is done, so all ranks make the same number of forward calls.
    """
    device = inputs_embeds.device
    batch = inputs_embeds.shape[0]
    embed_tokens = lm.get_input_embeddings()
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), device=device)
    mask = attention_mask.to(device)
    positions = positions_from_mask(mask)
    # logits_to_keep=1: only the last position's logits ([B, V] rather than [B, L, V], GBs for a 7B).
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=1)
    last_pos = positions[:, -1:]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if tries is not None:
            logits = _constrain(logits, tries, generated, done)
        next_tok = logits.argmax(-1)
        next_tok = torch.where(done, torch.full_like(next_tok, pad_id), next_tok)
        for i in range(batch):
            if not done[i]:
                generated[i].append(int(next_tok[i]))
        finished_now = torch.isin(next_tok, stop)
        if tries is not None:
            finished_now |= torch.tensor([tries[i].complete(generated[i]) for i in range(batch)], device=device)
        done |= finished_now
        local_done = bool(done.all()) or step == max_new_tokens - 1
        if (all_done(local_done) if all_done is not None else local_done):
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = lm(
            inputs_embeds=embed_tokens(next_tok[:, None]).to(inputs_embeds.dtype),
            attention_mask=mask,
            position_ids=last_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    stop_set = set(int(s) for s in stop_ids)
    return [row[:-1] if row and row[-1] in stop_set else row for row in generated]


def _constrain(logits: torch.Tensor, tries: Sequence[CandidateTrie], generated: list[list[int]],
               done: torch.Tensor) -> torch.Tensor:
    allowed_mask = torch.zeros_like(logits, dtype=torch.bool)
    for i, trie in enumerate(tries):
        if done[i]:
            allowed_mask[i] = True  # ignored: finished rows are fed padding
            continue
        allowed = trie.allowed(generated[i])
        if allowed:
            allowed_mask[i, allowed] = True
        else:
            allowed_mask[i] = True  # cannot happen on a well-formed trie; decode freely rather than NaN
    return logits.masked_fill(~allowed_mask, float("-inf"))


@torch.no_grad()
def score_sequences(
    lm: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    length_norm: bool = False,
) -> np.ndarray:
    """Log-likelihood of each token sequence as the continuation of one prompt.

    ``prompt_embeds [L, D]`` is a single unpadded prompt; all candidates are scored in one forward
    over ``[C, L + T]`` rows (prompt + candidate tokens, right-padded). Returns ``[C]`` float64:
    the sum of the candidates' token log-probabilities (the mean when ``length_norm``).
    """
    device = prompt_embeds.device
    n, plen = len(sequences), prompt_embeds.shape[0]
    tmax = max(len(s) for s in sequences)
    ids = torch.full((n, tmax), pad_id, dtype=torch.long, device=device)
    tok_mask = torch.zeros(n, tmax, dtype=torch.bool, device=device)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        tok_mask[i, : len(seq)] = True
    cont = lm.get_input_embeddings()(ids).to(prompt_embeds.dtype)
    embeds = torch.cat([prompt_embeds.unsqueeze(0).expand(n, -1, -1), cont], dim=1)
    attn = torch.cat([torch.ones(n, plen, dtype=torch.long, device=device), tok_mask.long()], dim=1)
    positions = torch.arange(plen + tmax, device=device).unsqueeze(0).expand(n, -1)
    # The logit at position p predicts token p + 1: candidate token j is predicted at plen - 1 + j,
    # so only the last tmax + 1 positions' logits are needed (and computed), of which the first tmax.
    logits = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, logits_to_keep=tmax + 1).logits
    logp = logits[:, :tmax, :].float().log_softmax(-1)
    tok_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * tok_mask
    total = tok_logp.sum(-1).double()
    if length_norm:
        total = total / tok_mask.sum(-1).double()
    return total.cpu().numpy()
