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
import time

import numpy as np
import torch


@torch.no_grad()
def _full_rows(lm, prompt_embeds, sequences, pad_id):
    """The reference: [C, L + T] rows, the prompt repeated for every candidate, one forward."""
    device = prompt_embeds.device
    n, plen = len(sequences), prompt_embeds.shape[0]
    tmax = max(len(s) for s in sequences)
    ids = torch.full((n, tmax), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(n, tmax, dtype=torch.bool, device=device)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    embeds = torch.cat([prompt_embeds.unsqueeze(0).expand(n, -1, -1), lm.get_input_embeddings()(ids)], 1)
    attn = torch.cat([torch.ones(n, plen, dtype=torch.long, device=device), mask.long()], 1)
    pos = torch.arange(plen + tmax, device=device).unsqueeze(0).expand(n, -1)
    logits = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, logits_to_keep=tmax + 1).logits
    logp = logits[:, :tmax].float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1).double().cpu().numpy()


def _timed(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


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
    prompts = [lm.get_input_embeddings()(torch.randint(10, len(tok) - 8, (args.length,), generator=g).to(args.device))
               for _ in range(args.prompts)]
    cands = [[torch.randint(10, len(tok) - 8, (1 + (c % args.title_tokens),), generator=g).tolist() + [tok.eos_token_id]
              for c in range(args.candidates)] for _ in prompts]
    pad = tok.pad_token_id

    with torch.no_grad():
        cached, t_cached = _timed(lambda: [score_sequences(lm, p, c, pad_id=pad) for p, c in zip(prompts, cands)],
                                  args.device, args.repeats)
        full, t_full = _timed(lambda: [_full_rows(lm, p, c, pad) for p, c in zip(prompts, cands)], args.device, args.repeats)
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
