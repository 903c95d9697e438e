"""Tiny random checkpoints with the layout of real families, saved like real ones (bf16,
`save_pretrained`), their tokenizers built here with the `tokenizers` library (no downloads).

- ``llama2``: metaspace BPE with byte fallback, BOS, no pad, separate LM head;
- ``llama3``: byte-level BPE, BOS, no pad;
- ``qwen2``:  byte-level BPE, no BOS, pad = EOS, padded (spare) embedding rows, tied embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama2", "llama3", "qwen2")
SPARE_ROWS = 40  # qwen2: embedding rows beyond the tokenizer, as Qwen2.5 ships (152,064 rows)
SENTINEL = 7.0  # the spare rows' value: no initialisation of ours produces it


def _train_bpe(corpus: list[str], pre_tokenizer, special: list[str], vocab_size: int = 700, **bpe) -> dict:
    """Vocabulary and merges of a BPE trained on ``corpus`` (as a ``tokenizers`` model dict)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(**bpe))
    raw.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    return json.loads(raw.to_str())["model"]


def _llama2_tokenizer(corpus):
    """Llama-2 layout: SentencePiece-style metaspace BPE, byte-fallback tokens <0x00>..<0xFF> in
    the vocabulary, <s> prepended, no pad token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained = _train_bpe(corpus, meta, ["<unk>", "<s>", "</s>"], unk_token="<unk>")
    vocab = dict(trained["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    raw = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.pre_tokenizer = meta
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_level_tokenizer(corpus, special: list[str], bos: str | None, eos: str, pad: str | None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained = _train_bpe(corpus, byte_level, special)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    raw = Tokenizer(models.BPE(trained["vocab"], merges))
    raw.pre_tokenizer = byte_level
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if bos is not None:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, trained["vocab"][bos])])
    else:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad)


def _model(family: str, tok) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)
    if family == "qwen2":
        cfg = Qwen2Config(vocab_size=len(tok) + SPARE_ROWS, tie_word_embeddings=True, bos_token_id=None,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **sizes)
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    if family == "qwen2":
        with torch.no_grad():  # the spare rows hold a value no initialisation of ours would produce
            model.get_input_embeddings().weight[len(tok):] = SENTINEL
    return model


def make_checkpoint(family: str, titles: list[str], out: Path) -> Path:
    """A tiny random checkpoint of ``family`` saved like a real one (bf16, ``save_pretrained``)."""
    from llara_dist.data.tokenizer import _training_corpus

    corpus = _training_corpus(titles)
    if family == "llama2":
        tok = _llama2_tokenizer(corpus)
    elif family == "llama3":
        tok = _byte_level_tokenizer(corpus, ["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>",
                                    eos="<|end_of_text|>", pad=None)
    else:
        tok = _byte_level_tokenizer(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                                    eos="<|endoftext|>", pad="<|endoftext|>")
    torch.manual_seed(0)
    model = _model(family, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
