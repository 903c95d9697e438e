"""What a real checkpoint family brings that the tiny preset hides: bf16 weights saved with
`save_pretrained`, spare (padded) embedding rows, SentencePiece-only tokenizers, weights on another
device than the host."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llara_dist.config import load_config
from llara_dist.data.prompts import SPECIAL_TOKENS
from llara_dist.errors import ConfigError
from llara_dist.model.llara import _init_new_rows, build_model, load_tokenizer
from tests.conftest import TINY_CONFIG

TITLES = [f"Movie {i} the great adventure" for i in range(40)]


def _checkpoint(tmp_path, rows_extra: int):
    """A tiny Llama saved in bf16 with a tokenizer that lacks the LLaRA tokens (like Llama-2's or
    Qwen's), with ``rows_extra`` spare rows beyond the tokenizer (Qwen2.5 pads its vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TITLES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = tok.get_vocab()
    n_rows = len(vocab) + rows_extra
    cfg = LlamaConfig(vocab_size=n_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # spare rows hold a sentinel no initialisation would produce
        model.get_input_embeddings().weight[len(vocab):] = 7.0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def _cfg(path, *extra):
    return load_config(TINY_CONFIG, [f"model.name_or_path={path}", "model.dtype=bfloat16", *extra])


def test_new_rows_are_set_on_the_weights_own_device():
    # A weight on another device than the host (meta stands in for CUDA here): the seeded noise is
    # drawn on the CPU and must be moved, or the write fails with a device mismatch.
    weight = torch.empty(12, 8, device="meta", dtype=torch.bfloat16)
    _init_new_rows(weight, 10, {10: "[HistoryEmb]", 11: "[CansEmb]"})
    cpu = torch.randn(12, 8).to(torch.bfloat16)
    _init_new_rows(cpu, 10, {10: "[HistoryEmb]", 11: "[CansEmb]"})
    assert cpu.dtype == torch.bfloat16 and not torch.equal(cpu[10], cpu[11])


def test_placeholders_on_spare_rows_of_a_padded_checkpoint_are_initialised(tmp_path):
    path = _checkpoint(tmp_path, rows_extra=32)
    cfg = _cfg(path)
    tok = load_tokenizer(cfg.model, TITLES)
    model = build_model(cfg, tok, rec_dim=8)
    emb = model.lm.get_base_model().get_input_embeddings().weight
    n_real = tok.vocab_size
    assert emb.shape[0] == n_real + 32  # no resize: the spare rows take the new tokens
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] + [tok.pad_token_id]
    assert all(i >= n_real for i in ids)
    assert sorted(model.meta["initialized_rows"]) == sorted(ids)
    mean = emb[:n_real].float().mean(0)
    for i in ids:
        assert not torch.all(emb[i] == 7.0), "placeholder kept the checkpoint's untrained spare row"
        assert (emb[i].float() - mean).abs().max() < 1.0
    # Spare rows no token uses are left as the checkpoint has them.
    unused = sorted(set(range(n_real, emb.shape[0])) - set(ids))
    assert torch.all(emb[unused[0]] == 7.0)


def test_model_trains_from_step_one_and_trainables_share_the_base_dtype(tmp_path):
    path = _checkpoint(tmp_path, rows_extra=0)
    cfg = _cfg(path, "model.gradient_checkpointing=true", "lora.dropout=0.5")
    model = build_model(cfg, load_tokenizer(cfg.model, TITLES), rec_dim=8)
    base = model.lm.get_base_model()
    # from_pretrained returns eval mode; gradient checkpointing and LoRA dropout only act in train mode.
    assert model.training and base.training and all(m.training for m in model.modules())
    assert base.is_gradient_checkpointing
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}, dtypes  # DeepSpeed needs one dtype (ZeRO-3 + zero_init asserts)
    # LoRA dropout is active: the same input gives different outputs twice.
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    kw = dict(attention_mask=torch.ones_like(ids), slots=torch.full_like(ids, -1),
              batch_items=torch.empty(0, dtype=torch.long), item_table=torch.zeros(1, 8))
    for lora_b in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(lora_b)  # non-zero B so dropout on A's input shows in the output
    assert not torch.equal(model(ids, **kw).logits, model(ids, **kw).logits)


def _sentencepiece_checkout(tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TITLES * 5), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 300}))
    return tmp_path


def test_sentencepiece_only_checkout_loads(tmp_path):
    cfg = _cfg(_sentencepiece_checkout(tmp_path))
    tok = load_tokenizer(cfg.model, TITLES)
    for t in SPECIAL_TOKENS:  # each placeholder is one token, never split
        tid = tok.convert_tokens_to_ids(t)
        assert tid != tok.unk_token_id
        assert tok(f"Movie {t} the", add_special_tokens=False)["input_ids"].count(tid) == 1
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id


def test_sentencepiece_only_checkout_without_the_package_fails_up_front(tmp_path, monkeypatch):
    import importlib.util

    cfg = _cfg(_sentencepiece_checkout(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tokenizer\.model is a SentencePiece model .*pip install sentencepiece"):
        load_tokenizer(cfg.model, TITLES)
