"""Decoding for evaluation: free greedy, trie-constrained greedy, and candidate scoring.

All three start from ``inputs_embeds`` (the prompt with item embeddings already injected by
``LlaraModel.embed``) and drive a Hugging Face causal LM (PEFT-wrapped or not) directly. Greedy
decoding is the model package's one loop (``llara_dist.model.generation``: explicit positions, KV
cache, a stop rule synchronised across ranks); evaluation adds the candidate-title trie that
constrains it, and scoring.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from llara_dist.model.generation import greedy_generate, pad_right

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
    """Free (``tries=None``) or trie-constrained greedy decoding from left-padded ``inputs_embeds``.

    ``tries`` (one per row) restrict each step to tokens continuing one of the row's candidate
    sequences; a constrained row stops when it completes one (its EOS). Rows also stop at any of
    ``stop_ids`` (not returned) or after ``max_new_tokens``. The loop, including the rank-synchronised
    ``all_done`` stop rule, is the model's :func:`~llara_dist.model.generation.greedy_generate`.
    """
    return greedy_generate(lm, inputs_embeds, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                           pad_id=pad_id, constraints=tries, all_done=all_done)


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

    ``prompt_embeds [L, D]`` is a single unpadded prompt. It is run once, and its KV cache is
    shared by all candidates: the second forward covers only the ``[C, T]`` candidate tokens
    (right-padded). The prompt dominates the cost (hundreds of tokens against a title's few), so
    this is ~C times cheaper than running prompt + candidate per row. Returns ``[C]`` float64: the
    sum of the candidates' token log-probabilities (the mean when ``length_norm``).
    """
    device = prompt_embeds.device
    n, plen = len(sequences), prompt_embeds.shape[0]
    ids, tok_mask = pad_right(sequences, pad_id, device)
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
