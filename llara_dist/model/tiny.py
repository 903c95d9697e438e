"""The `tiny` preset: a small, randomly initialised Llama built locally (tests, CPU demo).

It is the same architecture as Llama-2 (RMSNorm, rotary positions, SwiGLU MLP, untied LM head),
only small, so every code path used with a real checkpoint (embedding resize, LoRA targets,
ZeRO-3 partitioning) is exercised on CPU. Nothing is downloaded.

The weights are drawn from a generator seeded by ``model.tiny.seed``: every Ray worker, every
resume and every evaluation rebuilds bit-identical base weights (ZeRO-3 partitions each rank's
own copy, so the copies must agree).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llara_dist.config import TinyModelConfig


def tiny_llama_config(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                      attn_implementation: str | None = None) -> LlamaConfig:
    """A `LlamaConfig` of the preset's shape for ``vocab_size`` embedding rows."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads or tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # like Llama-2: the LM head is its own matrix
        # Larger than Llama's 0.02, whose flat random logits LoRA can hardly move through the
        # frozen head (measured: 8 LoRA steps took the loss 5.99 -> 5.33 at 0.02, 6.07 -> 1.98 at
        # 0.1) and whose greedy answers barely depend on the prompt (3 vs 8 distinct of 8).
        initializer_range=0.1,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def build_tiny_llama(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                     dtype: torch.dtype = torch.float32,
                     attn_implementation: str | None = None) -> LlamaForCausalLM:
    """The tiny base model with ``vocab_size`` rows, weights fixed by ``tiny.seed``."""
    config = tiny_llama_config(tiny, tokenizer, vocab_size, attn_implementation)
    # fork_rng: seeding must not disturb the caller's random stream (e.g. data order).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)
