"""Greedy decoding from prompt embeddings: the one decoding loop of llara-dist.

``LlaraModel.generate`` runs :func:`greedy_generate`; evaluation's free and constrained decoding
call ``LlaraModel.generate`` (the constrained one with a candidate-title trie as ``constraints``).
It starts from ``inputs_embeds`` (a prompt with item embeddings already injected) rather than
token ids and drives a Hugging Face causal LM (PEFT-wrapped or not) itself, because decoding here
needs three things ``transformers``' ``generate()`` does not give together:

- explicit position ids from the attention mask, so a left-padded row decodes exactly as it would
  alone (any batch size gives the same answers);
- an optional per-row prefix constraint (e.g. evaluation's candidate-title trie);
- a stop rule that can be synchronised across ranks: under ZeRO-3 every forward is a collective,
  so a rank that stopped early would leave the others waiting forever.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """RoPE positions that start at 0 at each row's first real token (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PrefixConstraint(Protocol):
    """Which tokens may follow a row's generated ``prefix``, and when the row is finished."""

    def allowed(self, prefix: Sequence[int]) -> Sequence[int]:
        """Token ids that may come next (empty: no constraint can be met; the row decodes freely)."""

    def complete(self, prefix: Sequence[int]) -> bool:
        """Whether ``prefix`` is a finished answer (the row stops)."""


def all_ranks_done(local_done: bool, device: torch.device) -> bool:
    """True once every rank of the default process group is done.

    An all-reduce: every rank must call it at every decoding step, which is what keeps ZeRO-3
    ranks making the same number of forward calls.
    """
    import torch.distributed as dist

    busy = torch.tensor([0 if local_done else 1], device=device)
    dist.all_reduce(busy, op=dist.ReduceOp.SUM)
    return int(busy.item()) == 0


@torch.no_grad()
def greedy_generate(
    lm: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    constraints: Sequence[PrefixConstraint] | None = None,
    all_done: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding with a KV cache from left-padded ``inputs_embeds [B, L, D]``.

    Returns each row's new tokens. A row stops at any of ``stop_ids`` (not included in the
    result) or after ``max_new_tokens``. ``constraints`` (one per row) restrict each step to the
    row's allowed tokens; a constrained row also stops once its constraint says ``complete``.
    ``all_done(local_done) -> bool`` (e.g. :func:`all_ranks_done`) is asked after every step,
    and decoding goes on, feeding ``pad_id`` to finished rows, until it says every caller is done.
    """
    batch = inputs_embeds.shape[0]
    if constraints is not None and len(constraints) != batch:
        raise ValueError(f"greedy_generate: {len(constraints)} constraints for {batch} rows")
    device = inputs_embeds.device
    embed_tokens = lm.get_input_embeddings()
    stops = {int(s) for s in stop_ids}
    mask = attention_mask.to(device)
    positions = positions_from_mask(mask)
    # logits_to_keep=1: only the last position's logits ([B, V] rather than [B, L, V], GBs for a 7B).
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if constraints is not None:
            logits = _constrain(logits, constraints, generated, finished)
        tok = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
        for i, t in enumerate(tok.tolist()):  # one device sync per step
            if finished[i]:
                continue
            generated[i].append(t)
            finished[i] = t in stops or (constraints is not None and constraints[i].complete(generated[i]))
        last_step = step == max_new_tokens - 1
        local_done = last_step or all(finished)
        # Asked on the last step too, so that every rank makes the same calls.
        if (all_done(local_done) if all_done is not None else local_done) or last_step:
            break
        done = torch.tensor(finished, device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = lm(inputs_embeds=embed_tokens(tok[:, None]).to(inputs_embeds.dtype), attention_mask=mask,
                 position_ids=next_pos, past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    return [row[:-1] if row and row[-1] in stops else row for row in generated]


def _constrain(logits: Tensor, constraints: Sequence[PrefixConstraint], generated: list[list[int]],
               finished: list[bool]) -> Tensor:
    """``logits`` with every token a row's constraint does not allow set to -inf."""
    allowed_mask = torch.zeros_like(logits, dtype=torch.bool)
    for i, constraint in enumerate(constraints):
        allowed = [] if finished[i] else list(constraint.allowed(generated[i]))
        if allowed:
            allowed_mask[i, allowed] = True
        else:
            # Finished rows are fed padding anyway. Nothing allowed cannot happen with a
            # well-formed trie; should it, decoding freely beats a row of -inf logits.
            allowed_mask[i] = True
    return logits.masked_fill(~allowed_mask, float("-inf"))
