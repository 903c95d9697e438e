"""The shared greedy loop with a constraint that is not eval's trie (any `allowed`/`complete` object)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llara_dist.model.generation import greedy_generate

VOCAB, EOS, PAD = 48, 2, 0


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


class EvenTokens:
    """Only even token ids; an answer is complete after ``length`` tokens."""

    def __init__(self, length: int):
        self.length = length

    def allowed(self, prefix):
        return range(4, VOCAB, 2)

    def complete(self, prefix):
        return len(prefix) == self.length


def test_any_prefix_constraint_object_steers_each_row(lm):
    ids = torch.tensor([[PAD, 5, 7, 9], [11, 13, 15, 17]])
    mask = (ids != PAD).long()
    embeds = lm.get_input_embeddings()(ids)
    free = greedy_generate(lm, embeds, mask, max_new_tokens=5, stop_ids=[], pad_id=PAD)
    assert any(t % 2 for row in free for t in row), "the random model alone should emit an odd token"
    out = greedy_generate(lm, embeds, mask, max_new_tokens=5, stop_ids=[], pad_id=PAD,
                          constraints=[EvenTokens(2), EvenTokens(4)])
    assert [len(r) for r in out] == [2, 4]  # each row stopped when its own constraint said complete
    assert all(t % 2 == 0 and t >= 4 for row in out for t in row)
    # Row 0 finished first and was fed padding; row 1 still decodes as it would alone.
    alone = greedy_generate(lm, embeds[1:], mask[1:], max_new_tokens=5, stop_ids=[], pad_id=PAD,
                            constraints=[EvenTokens(4)])
    assert alone == out[1:]
    with pytest.raises(ValueError, match="1 constraints for 2 rows"):
        greedy_generate(lm, embeds, mask, max_new_tokens=2, stop_ids=[], pad_id=PAD, constraints=[EvenTokens(1)])
