"""Greedy generation from injected embeddings: `LlaraModel.generate` (KV cache, batched, left
padding) against re-running the whole sequence for every new token, one prompt at a time.

Same model (random Llama of the given shape + LoRA + projector), same left-padded hybrid prompts,
same number of new tokens (no stop token, so every row decodes `--new-tokens` tokens). The rows
are asserted identical across the three ways before any time is printed.

    python benchmarks/bench_generate.py                      # CPU, a small Llama shape
    python benchmarks/bench_generate.py --hidden 1024 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _timing import timed


def _model(args):
    from llara_dist.config import load_config
    from llara_dist.model.llara import build_model, load_tokenizer

    h = args.hidden
    cfg = load_config(None, [f"model.tiny.hidden_size={h}", f"model.tiny.num_hidden_layers={args.layers}",
                             f"model.tiny.num_attention_heads={max(1, h // 64)}", f"model.tiny.intermediate_size={4 * h}",
                             "model.tiny.vocab_size=4096", f"model.dtype={args.dtype}"])
    titles = [f"Item {i} {w}" for i, w in enumerate("alpha beta gamma delta epsilon zeta eta theta".split() * 100)]
    tok = load_tokenizer(cfg.model, titles)
    return build_model(cfg, tok, rec_dim=64).to(args.device).eval(), tok, len(titles)


def _prompts(args, tok, n_items):
    """Left-padded prompts of different lengths, 20 injected items each."""
    from llara_dist.data.prompts import HISTORY_TOKEN

    g = torch.Generator().manual_seed(0)
    hist = tok.convert_tokens_to_ids(HISTORY_TOKEN)
    B, L = args.batch, args.length
    ids = torch.full((B, L), tok.pad_token_id)
    mask = torch.zeros((B, L), dtype=torch.long)
    items = torch.full((B, L), -1)
    for b in range(B):
        n = L - 7 * b  # rows differ in length: left padding matters
        row = torch.randint(10, len(tok) - 8, (n,), generator=g)
        row[1:41:2] = hist
        ids[b, L - n:], mask[b, L - n:] = row, 1
        items[b, L - n + 1:L - n + 41:2] = torch.randint(0, n_items, (20,), generator=g)
    batch_items, inverse = torch.unique(items[items >= 0], return_inverse=True)
    slots = torch.full_like(items, -1)
    slots[items >= 0] = inverse
    return ids, mask, slots, batch_items


@torch.no_grad()
def _uncached(model, ids, mask, slots, batch_items, table, n_new):
    """One prompt at a time, the full sequence re-run for each new token (no KV cache)."""
    out = []
    for b in range(ids.shape[0]):
        keep = mask[b] == 1
        embeds = model.embed(ids[b:b + 1, keep], slots[b:b + 1, keep], batch_items, table)
        row = []
        for _ in range(n_new):
            tok = int(model.lm_logits(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=ids.device))[0, -1].argmax())
            row.append(tok)
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[tok]], device=ids.device)).to(embeds.dtype)], 1)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, n_items = _model(args)
    table = np.random.default_rng(0).standard_normal((n_items + 1, 64)).astype(np.float32)
    ids, mask, slots, items = (t.to(args.device) for t in _prompts(args, tok, n_items))
    n = args.new_tokens

    def batched():
        return model.generate(ids, mask, slots, items, table, max_new_tokens=n, stop_token_ids=[])

    def one_by_one():
        return [model.generate(ids[b:b + 1], mask[b:b + 1], slots[b:b + 1], items, table, max_new_tokens=n,
                               stop_token_ids=[])[0] for b in range(ids.shape[0])]

    batched()  # warm-up
    rows = {}
    times = {}
    for name, fn in [("generate, batch %d" % args.batch, batched), ("generate, batch 1 x %d" % args.batch, one_by_one),
                     ("no KV cache, batch 1 x %d" % args.batch, lambda: _uncached(model, ids, mask, slots, items, table, n))]:
        rows[name], times[name] = timed(fn, args.device)
    first = next(iter(rows.values()))
    for name, r in rows.items():
        assert r == first, f"{name} decoded different tokens"
    total = args.batch * n
    base = times[next(iter(times))]
    print(f"greedy generation: hidden {args.hidden}, {args.layers} layers, prompts {args.length} tokens "
          f"(left-padded), {n} new tokens x {args.batch} rows, {args.dtype} on {args.device}; outputs identical")
    print(f"{'way':<28}{'seconds':>10}{'tokens/s':>12}{'vs batched':>12}")
    for name, t in times.items():
        print(f"{name:<28}{t:>10.2f}{total / t:>12.1f}{t / base:>11.1f}x")


if __name__ == "__main__":
    main()
