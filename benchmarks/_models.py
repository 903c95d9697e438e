"""Models of a real architecture with random weights, for benchmarks (imported from the scripts'
own directory).

Throughput, memory and decoding speed do not depend on the weights' values, so a benchmark needs
only a *config-only checkout*: ``config.json`` of the architecture plus a tokenizer, built here
locally (no hub, no multi-GB download). ``model.random_init: true`` then builds the architecture
through the same `build_model` path a real run takes (embedding rows, LoRA, projector, ZeRO-3
``zero_init``). The tokenizer is trained on the benchmark's titles and is smaller than the
architecture's vocabulary: the checkpoint's rows are then "padded" (as in Qwen2.5), while the LM
head keeps the architecture's full width, so its cost is counted.
"""

from __future__ import annotations

from pathlib import Path

# Llama-2-7B's published config.json values (meta-llama/Llama-2-7b-hf).
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False),
    # The same code path at a size a CPU runs in seconds (`--smoke`).
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
}


def bench_titles(n: int = 2400) -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    return [f"Item {i} {words[i % len(words)]}" for i in range(n)]


def config_only_checkout(preset: str, root: str | Path) -> Path:
    """``root/<preset>``: a Llama ``config.json`` of ``preset`` and a locally trained tokenizer."""
    from transformers import LlamaConfig

    from llara_dist.data.tokenizer import build_tiny_tokenizer

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    out = Path(root) / preset
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(bench_titles(), vocab_size=min(4096, PRESETS[preset]["vocab_size"] // 2))
    tok.save_pretrained(out)
    LlamaConfig(**PRESETS[preset], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                architectures=["LlamaForCausalLM"]).save_pretrained(out)
    return out


def random_model_overrides(preset: str, root: str | Path, dtype: str) -> list[str]:
    """Config overrides that build ``preset`` with random weights through `build_model`."""
    path = config_only_checkout(preset, root)
    return [f"model.name_or_path={path}", "model.random_init=true", f"model.dtype={dtype}",
            "model.attn_implementation=sdpa"]


def bench_model_overrides(preset: str | None, root: str | Path, dtype: str, hidden: int, layers: int) -> list[str]:
    """Overrides for a benchmark's model: ``preset`` with random weights, or the tiny preset at
    ``hidden`` x ``layers`` (64-wide heads, 4x MLP, a 4k-token vocabulary)."""
    if preset:
        return random_model_overrides(preset, root, dtype)
    return [f"model.tiny.hidden_size={hidden}", f"model.tiny.num_hidden_layers={layers}",
            f"model.tiny.num_attention_heads={max(1, hidden // 64)}", f"model.tiny.intermediate_size={4 * hidden}",
            "model.tiny.vocab_size=4096", f"model.dtype={dtype}"]
