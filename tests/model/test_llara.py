"""The LLaRA model on the tiny preset: training forward/backward, injection, generation, export."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from llara_dist.config import load_config
from llara_dist.errors import ConfigError

TITLES = [f"Movie {w} ({1980 + i})" for i, w in enumerate(
    ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet", "Kilo", "Lima"] * 3)]
N_ITEMS = len(TITLES)
REC_DIM = 12


def tiny_cfg(*overrides: str):
    from pathlib import Path

    return load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                       ["model.tiny.vocab_size=400", *overrides])


def _samples(n: int, seed: int = 0) -> list[dict]:
    """Samples in the shard format, histories of different lengths (so prompts differ in length)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        history = rng.choice(N_ITEMS, size=int(rng.integers(2, 7)), replace=False).tolist()
        target = int(rng.integers(N_ITEMS))
        others = [i for i in rng.permutation(N_ITEMS).tolist() if i != target][:3]
        candidates = others + [target]
        rng.shuffle(candidates)
        out.append({"key": f"u{u}-t{len(history)}", "user": u, "history": history, "target": target,
                    "candidates": [int(c) for c in candidates]})
    return out


SAMPLES = _samples(8)


@pytest.fixture(scope="module")
def tokenizer():
    from llara_dist.model.llara import load_tokenizer

    return load_tokenizer(tiny_cfg().model, TITLES)


@pytest.fixture(scope="module")
def item_table() -> np.ndarray:
    # Like the array Ray's object store hands a worker: float32, read-only, padding row last.
    table = np.random.default_rng(0).standard_normal((N_ITEMS + 1, REC_DIM)).astype(np.float32)
    table.setflags(write=False)
    return table


@pytest.fixture(scope="module")
def model(tokenizer):
    from llara_dist.model.llara import build_model

    return build_model(tiny_cfg(), tokenizer, REC_DIM)


def make_batch(tokenizer, samples, *, mode: str = "hybrid", generation: bool = False) -> dict:
    """A batch through the real prompt builder and collators (train: right-padded with labels)."""
    from llara_dist.data.collate import GenerationCollator, TrainCollator
    from llara_dist.data.prompts import build_prompt

    prompts = [build_prompt(s, TITLES, mode=mode, domain="movie", seed=0) for s in samples]
    collator = (GenerationCollator if generation else TrainCollator)(tokenizer, 512)
    return collator(prompts)


def _gen_args(batch, item_table):
    return batch["input_ids"], batch["attention_mask"], batch["slots"], batch["batch_items"], item_table


def test_only_lora_and_projector_train(model):
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    assert all("lora_" in n or n.startswith("projector.") for n in trainable), trainable
    assert any(n.startswith("projector.") for n in trainable)
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{module}.lora_A" in n for n in trainable), module
    emb = model.lm.get_input_embeddings().weight
    head = model.lm.get_output_embeddings().weight
    assert not emb.requires_grad and not head.requires_grad


def test_forward_backward_reaches_projector_and_lora(model, tokenizer, item_table):
    m = copy.deepcopy(model).train()
    batch = make_batch(tokenizer, SAMPLES[:4])
    out = m(**batch, item_table=item_table)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert grads["projector.0.weight"].abs().sum() > 0
    # LoRA B starts at zero, so B (not yet A) receives the first gradient.
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_only_batch_items_are_projected(model, tokenizer, item_table):
    batch = make_batch(tokenizer, SAMPLES[:3], generation=True)
    seen = []
    handle = model.projector.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), out.clone())))
    try:
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table)
    finally:
        handle.remove()
    assert len(seen) == 1
    feats, rows = seen[0]
    items = batch["batch_items"]
    assert feats.shape == (len(items), REC_DIM) and len(items) < N_ITEMS
    assert torch.equal(feats, torch.from_numpy(item_table.copy())[items])
    slots = batch["slots"]
    assert torch.equal(embeds[slots >= 0], rows[slots[slots >= 0]])
    plain = model.embed_tokens(batch["input_ids"])
    assert torch.equal(embeds[slots < 0], plain[slots < 0])


def test_text_batch_injects_nothing(model, tokenizer, item_table):
    batch = make_batch(tokenizer, SAMPLES[:3], mode="text", generation=True)
    assert batch["batch_items"].numel() == 0 and (batch["slots"] == -1).all()
    calls = []
    handle = model.projector.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table)
    finally:
        handle.remove()
    assert not calls
    assert torch.equal(embeds, model.embed_tokens(batch["input_ids"]))


def test_optimiser_steps_reduce_loss(model, tokenizer, item_table):
    m = copy.deepcopy(model)
    batches = [make_batch(tokenizer, SAMPLES[:2]), make_batch(tokenizer, SAMPLES[2:4])]

    def eval_loss() -> float:  # dropout off: the before/after comparison is exact
        m.eval()
        with torch.no_grad():
            return float(np.mean([m(**b, item_table=item_table).loss.item() for b in batches]))

    before = eval_loss()
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for step in range(8):
        loss = m(**batches[step % 2], item_table=item_table).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def _greedy_reference(model, batch, item_table, n: int) -> list[int]:
    """Greedy decoding of one unpadded prompt by re-running the full sequence (no KV cache)."""
    embeds = model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table)
    out = []
    for _ in range(n):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        tok = int(model.lm_logits(embeds, mask)[0, -1].argmax())
        out.append(tok)
        embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return out


@torch.no_grad()
def test_generation_matches_uncached_reference_and_stops(model, tokenizer, item_table):
    model.eval()
    batch = make_batch(tokenizer, SAMPLES[3:4], generation=True)
    free = model.generate(*_gen_args(batch, item_table), max_new_tokens=6, stop_token_ids=[])[0]
    assert len(free) == 6 and free == _greedy_reference(model, batch, item_table, 6)
    # Stopping at a token drops it and everything after its first occurrence.
    stop = free[2]
    stopped = model.generate(*_gen_args(batch, item_table), max_new_tokens=6, stop_token_ids=[stop])[0]
    assert stopped == free[: free.index(stop)]


@torch.no_grad()
def test_generation_is_batch_size_invariant(model, tokenizer, item_table):
    model.eval()
    eos = [tokenizer.eos_token_id]
    batch = make_batch(tokenizer, SAMPLES, generation=True)
    assert (batch["attention_mask"] == 0).any(), "prompts must differ in length to test left padding"
    together = model.generate(*_gen_args(batch, item_table), max_new_tokens=8, stop_token_ids=eos)
    alone = []
    for sample in SAMPLES:
        one = make_batch(tokenizer, [sample], generation=True)
        assert (one["attention_mask"] == 1).all()
        alone += model.generate(*_gen_args(one, item_table), max_new_tokens=8, stop_token_ids=eos)
    assert together == alone
    assert all(0 < len(t) <= 8 and tokenizer.eos_token_id not in t for t in together)
    assert len({tuple(t) for t in together}) > 1, "every prompt gave the same answer: is the prompt ignored?"


@torch.no_grad()
def test_generation_depends_on_the_injected_items(model, tokenizer, item_table):
    model.eval()
    batch = make_batch(tokenizer, SAMPLES[:1], generation=True)
    other_table = np.ascontiguousarray(item_table[::-1])  # same prompt text, other item embeddings
    a = model.lm_logits(model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table),
                        batch["attention_mask"])
    b = model.lm_logits(model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], other_table),
                        batch["attention_mask"])
    assert (a - b).abs().max() > 1e-3


def test_special_token_rows_are_identical_across_rebuilds(tokenizer, model):
    from llara_dist.model.llara import build_model

    other = build_model(tiny_cfg("train.seed=7"), tokenizer, REC_DIM)  # another LoRA/projector seed
    ids = sorted(model.meta["special_token_ids"].values())
    for get in (lambda m: m.lm.get_input_embeddings().weight, lambda m: m.lm.get_output_embeddings().weight):
        a, b = get(model), get(other)
        assert torch.equal(a, b)  # the whole base, new rows included
        rows = a[ids]
        assert torch.isfinite(rows).all() and not torch.equal(rows[0], rows[1])
    # A different tiny seed is a different base model, so the seed really drives the weights.
    third = build_model(tiny_cfg("model.tiny.seed=1"), tokenizer, REC_DIM)
    assert not torch.equal(third.lm.get_input_embeddings().weight, model.lm.get_input_embeddings().weight)


def test_tokens_added_to_a_checkpoint_get_deterministic_rows(tokenizer, model):
    """The real-checkpoint path: tokens beyond the base vocabulary go through the resize."""
    from llara_dist.model.llara import build_model

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["[Extra1]", "[Extra2]"], special_tokens=True)
    n = len(tokenizer)
    assert tok.vocab_size == n and len(tok) == n + 2
    a, b = build_model(tiny_cfg(), tok, REC_DIM), build_model(tiny_cfg("train.seed=3"), tok, REC_DIM)
    assert a.meta["base_vocab_size"] == n
    for get in (lambda m: m.lm.get_input_embeddings().weight, lambda m: m.lm.get_output_embeddings().weight):
        wa, wb, w0 = get(a), get(b), get(model)
        assert wa.shape[0] == n + 2 and torch.equal(wa, wb)
        assert torch.equal(wa[:n], w0)  # the checkpoint's rows are untouched
        new = wa[n:]
        assert torch.isfinite(new).all() and not torch.equal(new[0], new[1])
        # Near the mean of the old rows: the new tokens start inside the old distribution.
        assert (new - w0.mean(0)).norm(dim=1).max() < w0.norm(dim=1).mean()


def test_export_round_trip(model, tokenizer, item_table, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llara_dist.model.llara import load_export, write_export

    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move LoRA B away from zero so the adapter matters
        loss = m(**make_batch(tokenizer, SAMPLES[:4]), item_table=item_table).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    out = write_export(m, tokenizer, tmp_path / "final", extra_config={"domain": "movie"})

    cfg = json.loads((out / "llara_config.json").read_text())
    assert cfg["domain"] == "movie" and cfg["rec_dim"] == REC_DIM
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    params = dict(m.named_parameters())
    assert len(shapes) == sum("lora_" in n for n in params)
    for key, shape in shapes.items():  # real shapes, not the ZeRO-3 Size([0]) trap
        assert shape and all(d > 0 for d in shape), (key, shape)

    batch = make_batch(tokenizer, SAMPLES, generation=True)
    with torch.no_grad():
        embeds = m.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table)
        expected = m.lm_logits(embeds, batch["attention_mask"])

        # Plain PEFT can open it: base from the export's base/ (tiny) + the adapter.
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
        from llara_dist.model.llara import positions_from_mask

        got = peft_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                         position_ids=positions_from_mask(batch["attention_mask"])).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)

        loaded, tok2, cfg2 = load_export(out)
        assert cfg2["domain"] == "movie" and len(tok2) == len(tokenizer)
        text = f"{TITLES[0]} [HistoryEmb], {TITLES[1]} [CansEmb]"
        assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]
        embeds2 = loaded.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table)
        assert torch.equal(embeds2, embeds)
        assert torch.equal(loaded.lm_logits(embeds2, batch["attention_mask"]), expected)
        args = _gen_args(batch, item_table)
        assert loaded.generate(*args, max_new_tokens=4, stop_token_ids=[]) == m.generate(*args, max_new_tokens=4,
                                                                                          stop_token_ids=[])

    # The same exporter from a plain state dict (what a DeepSpeed checkpoint yields), written over
    # the existing export: replaced whole, nothing left beside it; an ungathered ZeRO-3 partition
    # (Size([0])) is refused, naming the tensor.
    from llara_dist.errors import CheckpointError
    from llara_dist.model.llara import trainable_parameters

    state = {f"module.{n}": p.detach().clone() for n, p in trainable_parameters(m)}
    write_export(m, tokenizer, out, state=state, extra_config={"domain": "movie"})
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]
    again, _, _ = load_export(out)
    with torch.no_grad():
        assert torch.equal(again.lm_logits(embeds, batch["attention_mask"]), expected)
    lora_a = next(n for n in state if "lora_A" in n)
    with pytest.raises(CheckpointError, match=r"lora_A.*shape \(0,\).*ZeRO-3"):
        write_export(m, tokenizer, tmp_path / "bad", state={**state, lora_a: torch.empty(0)})

    # An incomplete export is one clear error naming the missing file.

    (out / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="projector.safetensors"):
        load_export(out)


def _local_checkpoint(path, tiny_cfg_model) -> None:
    """A local HF checkpoint (a saved tiny Llama) whose tokenizer lacks the LLaRA tokens, like Llama-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llara_dist.model.tiny import build_tiny_llama

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TITLES + ["This user has watched movies. Answer:"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    build_tiny_llama(tiny_cfg_model.tiny, tok, len(tok)).save_pretrained(path)
    tok.save_pretrained(path)


def test_local_checkpoint_export_round_trip(item_table, tmp_path):
    """The Llama-2 path: a local checkpoint, 4 tokens added, exported without its base weights."""
    import shutil

    from llara_dist.model.llara import build_model, load_export, load_tokenizer, write_export

    ckpt = tmp_path / "llama-local"
    _local_checkpoint(ckpt, tiny_cfg().model)
    cfg = tiny_cfg(f"model.name_or_path={ckpt}")
    tok = load_tokenizer(cfg.model, TITLES)
    m = build_model(cfg, tok, REC_DIM)
    assert m.meta["base_vocab_size"] + 4 == len(tok)  # [HistoryEmb], [CansEmb], [PH], <pad>
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    loss = m.train()(**make_batch(tok, SAMPLES[:2]), item_table=item_table).loss
    loss.backward()
    opt.step()
    m.eval()
    out = write_export(m, tok, tmp_path / "final")
    assert not (out / "base").exists()  # a real checkpoint is referenced, not copied

    moved = tmp_path / "mounted-elsewhere"
    shutil.move(ckpt, moved)
    batch = make_batch(tok, SAMPLES[:3], generation=True)
    with torch.no_grad():
        expected = m.lm_logits(m.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table),
                               batch["attention_mask"])
        with pytest.raises(ConfigError, match="model.name_or_path"):
            load_export(out)  # the recorded path is gone
        loaded, _, _ = load_export(out, name_or_path=str(moved))
        got = loaded.lm_logits(loaded.embed(batch["input_ids"], batch["slots"], batch["batch_items"], item_table),
                               batch["attention_mask"])
    assert torch.equal(got, expected)


def test_scorer_matches_token_by_token_logits(model, tokenizer, item_table):
    """eval's scorer (shared prompt KV cache through the PEFT model) on injected hybrid prompts."""
    from llara_dist.eval.decoding import continuation_logprobs

    model.eval()
    conts = [[5, 6, tokenizer.eos_token_id], [7]]
    with torch.no_grad():
        one = make_batch(tokenizer, [SAMPLES[0]], generation=True)
        prompt = model.embed(one["input_ids"], one["slots"], one["batch_items"], item_table)
        got = continuation_logprobs(model.lm, prompt[0], conts, pad_id=model.pad_token_id)
        for b, cont in enumerate(conts):
            embeds, total = prompt, 0.0
            for tok in cont:
                logits = model.lm_logits(embeds, torch.ones(embeds.shape[:2], dtype=torch.long))[0, -1]
                total += torch.log_softmax(logits, -1)[tok].item()
                embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[tok]]))], dim=1)
            assert got[b] == pytest.approx(total, abs=1e-4)


def test_missing_model_path_is_a_config_error(tokenizer, tmp_path):
    from llara_dist.model.llara import build_model, load_tokenizer

    missing = tmp_path / "no-such-llama"
    cfg = tiny_cfg(f"model.name_or_path={missing}")
    for call in (lambda: load_tokenizer(cfg.model, TITLES), lambda: build_model(cfg, tokenizer, REC_DIM)):
        with pytest.raises(ConfigError, match="model.name_or_path") as err:
            call()
        assert str(missing) in str(err.value)
