"""Prompts, tokenizers and collation on real shards: slot maps point at the right items."""

from __future__ import annotations

import pytest
import torch

from llara_dist.data.collate import IGNORE_INDEX, GenerationCollator, TrainCollator
from llara_dist.data.prompts import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_TOKEN, build_prompt, template_index
from llara_dist.data.shards import load_meta, load_titles, read_split, train_candidates
from llara_dist.data.tokenizer import build_tiny_tokenizer, encode_answers, prepare_tokenizer
from llara_dist.errors import DataError


@pytest.fixture(scope="module")
def data(tiny_shards):
    meta, titles = load_meta(tiny_shards), load_titles(tiny_shards)
    test = list(read_split(tiny_shards, "test"))[:16]
    train = list(read_split(tiny_shards, "train"))[:16]
    for s in train:
        s["candidates"] = train_candidates(s, meta["n_items"], meta["num_candidates"], seed=0, epoch=0)
    return meta, titles, train, test


@pytest.fixture(scope="module")
def tokenizer(data):
    return build_tiny_tokenizer(data[1], vocab_size=1024)


def test_build_prompt_hybrid_and_text(data):
    meta, titles, _, test = data
    s = test[0]
    p = build_prompt(s, titles, mode="hybrid", domain="movie", seed=0)
    assert p.text.count(HISTORY_TOKEN) == len(s["history"]) and p.text.count(CANDIDATE_TOKEN) == len(s["candidates"])
    assert TEXT_TOKEN not in p.text and p.answer == titles[s["target"]] and p.answer in p.text
    assert list(p.item_ids) == s["history"] + s["candidates"]
    # history titles appear in order, each followed by its placeholder
    pos = [p.text.index(f"{titles[i]} {HISTORY_TOKEN}") for i in s["history"]]
    assert pos == sorted(pos)
    t = build_prompt(s, titles, mode="text", domain="game", seed=0)
    assert t.text.count(TEXT_TOKEN) == len(p.item_ids) and HISTORY_TOKEN not in t.text and "game" in t.text
    # phrasing: deterministic per (seed, key), and all three are used
    assert build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) == p
    assert {template_index(0, x["key"]) for x in test} == {0, 1, 2}


def test_build_prompt_errors(data):
    _, titles, _, test = data
    with pytest.raises(DataError, match="no candidates"):
        build_prompt({k: v for k, v in test[0].items() if k != "candidates"}, titles, mode="hybrid",
                     domain="movie", seed=0)
    bad = list(titles)
    bad[test[0]["target"]] = "Evil [CansEmb] Title"
    with pytest.raises(DataError, match="reserved token"):
        build_prompt(test[0], bad, mode="hybrid", domain="movie", seed=0)


def test_tiny_tokenizer_is_deterministic_and_complete(data, tokenizer):
    again = build_tiny_tokenizer(data[1], vocab_size=1024)
    assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tokenizer, name) is not None
    n = len(tokenizer)
    prepare_tokenizer(tokenizer)
    assert len(tokenizer) == n  # idempotent
    ids = tokenizer(f"a {HISTORY_TOKEN}b{CANDIDATE_TOKEN}")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids(HISTORY_TOKEN) in ids and tokenizer.convert_tokens_to_ids(CANDIDATE_TOKEN) in ids


def _items(batch):
    """The item id at each placeholder (-1 elsewhere), as the model reads it: batch_items[slots]."""
    slots, bi = batch["slots"], batch["batch_items"]
    return torch.where(slots >= 0, bi[slots.clamp(min=0)] if bi.numel() else -1, -1)


def _check_slot_map(batch, prompts, tokenizer):
    slots, bi = batch["slots"], batch["batch_items"]
    assert torch.equal(bi, torch.unique(bi)) and bi.tolist() == sorted(set(i for p in prompts for i in p.item_ids))
    assert int(slots.max()) == len(bi) - 1  # every distinct item is used
    items = _items(batch)
    marks = {tokenizer.convert_tokens_to_ids(HISTORY_TOKEN), tokenizer.convert_tokens_to_ids(CANDIDATE_TOKEN)}
    for row, p in enumerate(prompts):
        at = [i for i, t in enumerate(batch["input_ids"][row].tolist()) if t in marks]
        assert at == (items[row] >= 0).nonzero().flatten().tolist()
        assert items[row, at].tolist() == list(p.item_ids)  # history then candidates, in order


def test_train_collator(data, tokenizer):
    meta, titles, train, _ = data
    prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=1) for s in train[:6]]
    batch = TrainCollator(tokenizer, max_length=1024)(prompts)
    b, width = batch["input_ids"].shape
    assert b == 6 and all(batch[k].shape == (b, width) for k in ("attention_mask", "labels", "slots"))
    _check_slot_map(batch, prompts, tokenizer)
    for row, p in enumerate(prompts):
        mask = batch["attention_mask"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        lab = batch["labels"][row]
        answer = lab[lab != IGNORE_INDEX].tolist()
        # The answer reads as running text after "Answer:" (a leading space), ending with EOS.
        assert answer[-1] == tokenizer.eos_token_id and tokenizer.decode(answer[:-1]) == " " + p.answer
        assert lab[n - 1] == tokenizer.eos_token_id  # labels end at the last real token
        assert (lab[n:] == IGNORE_INDEX).all()


def test_generation_collator_left_pads(data, tokenizer):
    _, titles, _, test = data
    prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in test[:5]]
    batch = GenerationCollator(tokenizer, max_length=1024)(prompts)
    assert "labels" not in batch
    _check_slot_map(batch, prompts, tokenizer)
    for row, p in enumerate(prompts):
        ids = tokenizer(p.text)["input_ids"]
        n = len(ids)
        assert batch["input_ids"][row, -n:].tolist() == ids  # prompt right-aligned
        assert batch["attention_mask"][row, -n:].all() and not batch["attention_mask"][row, :-n].any()


def test_text_mode_injects_nothing(data, tokenizer):
    _, titles, train, _ = data
    prompts = [build_prompt(s, titles, mode="text", domain="movie", seed=0) for s in train[:3]]
    for collator in (TrainCollator(tokenizer, 1024), GenerationCollator(tokenizer, 1024)):
        batch = collator(prompts)
        assert (batch["slots"] == -1).all()
        assert batch["batch_items"].numel() == 0


def test_too_long_prompts_lose_their_oldest_history_items(data, tokenizer):
    _, titles, train, test = data
    sample = next(s for s in train if len(s["history"]) >= 6)
    prompts = [build_prompt(sample, titles, mode="hybrid", domain="movie", seed=0)]
    full = TrainCollator(tokenizer, max_length=4096)(prompts)
    n = int(full["attention_mask"].sum())
    collate = TrainCollator(tokenizer, max_length=n - 12)  # ~2-3 history items too long
    with pytest.warns(UserWarning, match="oldest history item"):
        batch = collate(prompts)
    assert collate.truncated == 1 and int(batch["attention_mask"].sum()) <= n - 12
    items = _items(batch)[0]
    kept = items[items >= 0].tolist()
    dropped = len(prompts[0].item_ids) - len(kept)
    assert 1 <= dropped < len(sample["history"])
    assert kept == sample["history"][dropped:] + sample["candidates"]  # the oldest ones went
    lab = batch["labels"][0]
    assert tokenizer.decode(lab[lab != IGNORE_INDEX].tolist()[:-1]) == " " + prompts[0].answer
    # generation prompts are fitted the same way
    gen = GenerationCollator(tokenizer, max_length=n - 20)
    with pytest.warns(UserWarning):
        g = gen([build_prompt(sample, titles, mode="text", domain="movie", seed=0)])
    assert g["input_ids"].shape[1] <= n - 20 and gen.truncated == 1
    with pytest.raises(DataError, match="exceed data.max_length=32 even with one history item"):
        TrainCollator(tokenizer, max_length=32)(prompts)


def test_other_hf_tokenizer_without_pad(data):
    """A Llama-style (metaspace, no pad token) tokenizer is made ready by prepare_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    titles = data[1]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(titles + ["This user has watched Please predict Answer: Choose"],
                            trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        TrainCollator(tok, 1024)
    prepare_tokenizer(tok)
    assert tok.pad_token is not None
    _, _, train, _ = data
    prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in train[:4]]
    batch = TrainCollator(tok, 2048)(prompts)
    _check_slot_map(batch, prompts, tok)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_answer_tokens_are_the_candidates_tokens(data, tokenizer):
    """The answer is encoded exactly as its title is inside the candidate list, so a model can copy it.

    Encoded on its own, a byte-level BPE starts a text with a different token than the same word
    after a space; every answer would then begin with an id that never occurs in its prompt.
    """
    _, titles, train, _ = data
    collate = TrainCollator(tokenizer, max_length=1024)
    prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in train[:8]]
    batch = collate(prompts)
    differs = 0
    for row, p in enumerate(prompts):
        lab = batch["labels"][row]
        answer = lab[lab != IGNORE_INDEX].tolist()[:-1]
        n = int((lab == IGNORE_INDEX).long().argmin())  # the prompt ends where the labels start
        assert _contains(batch["input_ids"][row, :n].tolist(), answer), p.answer
        alone = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        differs += alone != answer
    assert differs > 0  # why the plain encoding is wrong for this tokenizer
    # The helper agrees with the collator and falls back to the plain encoding for an empty answer.
    assert encode_answers(tokenizer, [prompts[0].answer])[0] == batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()[:-1]
    assert encode_answers(tokenizer, [""]) == [tokenizer("", add_special_tokens=False)["input_ids"]]
