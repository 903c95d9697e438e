"""Decoding on a small random Llama: padding invariance, the trie constraint, candidate scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llara_dist.eval.decoding import CandidateTrie, continuation_logprobs
from llara_dist.model.generation import greedy_generate

VOCAB, EOS, PAD = 64, 2, 0


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, eos_token_id=EOS,
                      pad_token_id=PAD, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(3, VOCAB, size=int(g.integers(3, 12))).tolist() for _ in range(n)]


def test_trie_shared_prefixes():
    trie = CandidateTrie([[5, 6, EOS], [5, 6, 7, EOS], [5, 9, EOS], [8, EOS]])
    assert trie.allowed([]) == [5, 8]
    assert trie.allowed([5]) == [6, 9]
    assert trie.allowed([5, 6]) == [EOS, 7]
    assert not trie.complete([5, 6]) and trie.complete([5, 6, EOS])
    assert trie.allowed([4]) == []
    with pytest.raises(ValueError):
        CandidateTrie([[]])


def test_greedy_matches_generate_and_is_padding_invariant(lm):
    prompts = _prompts(5)
    embed = lm.get_input_embeddings()
    # Alone (no padding): our loop reproduces transformers' greedy generate.
    alone = []
    for p in prompts:
        ids = torch.tensor([p])
        ours = greedy_generate(lm, embed(ids), torch.ones_like(ids), max_new_tokens=8, stop_ids=[EOS], pad_id=PAD)[0]
        ref = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)[0, len(p):].tolist()
        ref = ref[: ref.index(EOS)] if EOS in ref else ref
        assert ours == ref
        alone.append(ours)
    # Left-padded together: identical to decoding each prompt alone.
    ids, mask = _left_pad(prompts)
    batched = greedy_generate(lm, embed(ids), mask, max_new_tokens=8, stop_ids=[EOS], pad_id=PAD)
    assert batched == alone


def test_sync_hook_keeps_stepping_until_told(lm):
    ids, mask = _left_pad(_prompts(2))
    calls = []

    def never_done(local_done: bool) -> bool:  # another rank still busy: keep stepping
        calls.append(local_done)
        return False

    greedy_generate(lm, lm.get_input_embeddings()(ids), mask, max_new_tokens=6, stop_ids=list(range(VOCAB)),
                    pad_id=PAD, all_done=never_done)
    # Every token is a stop token, so the batch is locally done at once; the hook still saw 6 steps.
    assert calls == [True] * 6


def test_constrained_answers_are_candidate_sequences(lm):
    # Titles sharing prefixes, one a prefix of another.
    titles = [[10, 11], [10, 11, 12], [10, 13, 14, 15], [20], [21, 10, 11]]
    prompts = _prompts(16, seed=1)
    ids, mask = _left_pad(prompts)
    tries = [CandidateTrie([t + [EOS] for t in titles])] * len(prompts)
    out = greedy_generate(lm, lm.get_input_embeddings()(ids), mask, max_new_tokens=6, stop_ids=[EOS],
                          pad_id=PAD, constraints=tries)
    assert all(o in titles for o in out)
    free = greedy_generate(lm, lm.get_input_embeddings()(ids), mask, max_new_tokens=6, stop_ids=[EOS], pad_id=PAD)
    assert not all(o in titles for o in free)  # the random model alone does not say titles


def test_score_matches_brute_force_likelihood(lm):
    prompt = _prompts(1, seed=2)[0]
    cands = [[10, 11, EOS], [10, 11, 12, EOS], [30, EOS], [40, 41, 42, 43, EOS]]
    emb = lm.get_input_embeddings()(torch.tensor(prompt))
    got = continuation_logprobs(lm, emb, cands, pad_id=PAD)
    got_norm = continuation_logprobs(lm, emb, cands, pad_id=PAD, length_norm=True)
    for i, c in enumerate(cands):
        ids = torch.tensor([prompt + c])
        with torch.no_grad():
            logp = lm(ids).logits[0].log_softmax(-1)
        brute = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(c))
        assert got[i] == pytest.approx(brute, abs=1e-4)
        assert got_norm[i] == pytest.approx(brute / len(c), abs=1e-4)


def test_score_refuses_empty_sequences(lm):
    emb = lm.get_input_embeddings()(torch.tensor(_prompts(1)[0]))
    with pytest.raises(ValueError, match="empty"):
        continuation_logprobs(lm, emb, [[10, EOS], []], pad_id=PAD)
