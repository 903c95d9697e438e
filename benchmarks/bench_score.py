"""Score decoding: the prompt run once with its KV cache shared by all candidates
(`eval.decoding.score_sequences`) against one full prompt + candidate row per candidate.

Same model (random Llama of the given shape + LoRA + projector), same hybrid prompt, 20 candidates
of a few tokens each, as in `llara-dist eval --decoding score`. The two ways' scores are asserted
equal (to float32 rounding) before any time is printed.

    python benchmarks/bench_score.py                         # CPU, a small Llama shape
    python benchmarks/bench_score.py --hidden 1024 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _timing import timed


def _full_rows(model, prompt_ids, sequences, table):
    """The reference: `LlaraModel.continuation_logprobs` over [C, L + T] rows, the prompt repeated
    for every candidate, one forward."""
    n, device = len(sequences), prompt_ids.device
    ids = prompt_ids.unsqueeze(0).expand(n, -1)
    return model.continuation_logprobs(ids, torch.ones_like(ids), torch.full_like(ids, -1),
                                       torch.empty(0, dtype=torch.long, device=device), table,
                                       sequences).double().cpu().numpy()


def main() -> None:
    from llara_dist.config import load_config
    from llara_dist.eval.decoding import score_sequences
    from llara_dist.model.llara import build_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=300, help="prompt tokens (ML-100K prompts: ~290)")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--title-tokens", type=int, default=7, help="tokens per candidate (+EOS)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    h = args.hidden
    cfg = load_config(None, [f"model.tiny.hidden_size={h}", f"model.tiny.num_hidden_layers={args.layers}",
                             f"model.tiny.num_attention_heads={max(1, h // 64)}", f"model.tiny.intermediate_size={4 * h}",
                             "model.tiny.vocab_size=4096"])
    titles = [f"Item {i} {w}" for i, w in enumerate("alpha beta gamma delta epsilon zeta eta theta".split() * 100)]
    tok = load_tokenizer(cfg.model, titles)
    model = build_model(cfg, tok, rec_dim=64).to(args.device).eval()
    lm = model.lm
    g = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(10, len(tok) - 8, (args.length,), generator=g).to(args.device) for _ in range(args.prompts)]
    prompts = [lm.get_input_embeddings()(ids) for ids in prompt_ids]
    table = torch.zeros(1, 64)  # text prompts: nothing is injected
    cands = [[torch.randint(10, len(tok) - 8, (1 + (c % args.title_tokens),), generator=g).tolist() + [tok.eos_token_id]
              for c in range(args.candidates)] for _ in prompts]
    pad = tok.pad_token_id

    with torch.no_grad():
        cached, t_cached = timed(lambda: [score_sequences(lm, p, c, pad_id=pad) for p, c in zip(prompts, cands)],
                                  args.device, args.repeats)
        full, t_full = timed(lambda: [_full_rows(model, ids, c, table) for ids, c in zip(prompt_ids, cands)],
                              args.device, args.repeats)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(cached, full))
    assert worst < 1e-3, f"cached and full-row scores differ by {worst}"
    assert all(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(cached, full))

    print(f"{args.prompts} prompts x {args.candidates} candidates, prompt {args.length} tokens, hidden {h}, "
          f"{args.layers} layers, {args.device}; best of {args.repeats}; max |score difference| {worst:.1e}")
    print("| way | seconds | per prompt (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, t in (("prompt + candidate per row", t_full), ("shared prompt KV cache", t_cached)):
        print(f"| {name} | {t:.3f} | {1000 * t / args.prompts:.1f} | {t_full / t:.1f}x |")


if __name__ == "__main__":
    main()
