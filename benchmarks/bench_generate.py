"""Greedy generation from injected embeddings: `LlaraModel.generate` (KV cache, batched, left
padding) against re-running the whole sequence for every new token, one prompt at a time.

Same model (random Llama of the given shape + LoRA + projector), same left-padded hybrid prompts,
same number of new tokens (no stop token, so every row decodes `--new-tokens` tokens). The rows
are asserted identical across the three ways before any time is printed.

    python benchmarks/bench_generate.py                      # CPU, a small Llama shape
    python benchmarks/bench_generate.py --hidden 1024 --layers 8 --device cuda
    python benchmarks/bench_generate.py --preset llama2-7b --dtype bfloat16 --device cuda   # random 7B
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from _models import bench_model_overrides, bench_titles
from _timing import timed, write_rows


def _model(args, tmp: str):
    from llara_dist.config import load_config
    from llara_dist.model.llara import build_model, load_tokenizer

    cfg = load_config(None, bench_model_overrides(args.preset, tmp, args.dtype, args.hidden, args.layers))
    titles = bench_titles(800)
    tok = load_tokenizer(cfg.model, titles)
    with torch.device(args.device):  # a random 7B initialises in seconds on the GPU
        model = build_model(cfg, tok, rec_dim=64)
    return model.to(args.device).eval(), tok, len(titles)


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
    ap.add_argument("--preset", help="a real architecture with random weights (_models.PRESETS) instead of --hidden/--layers")
    ap.add_argument("--smoke", action="store_true", help="the smoke preset, short prompts: checks the script runs")
    ap.add_argument("--json", help="also write the result rows as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batch, args.length, args.new_tokens = "smoke", 4, 80, 4
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
    model, tok, n_items = _model(args, tmp.name)
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
    flat = [t for row in first for t in row]
    agree = min(np.mean([a == b for a, b in zip(flat, [t for row in r for t in row])]) for r in rows.values())
    if args.dtype == "float32":
        for name, r in rows.items():
            assert r == first, f"{name} decoded different tokens"
    # In half precision, kernels for different batch shapes round differently; with random weights
    # (near-flat logits) a greedy pick can flip, so agreement is reported rather than asserted.
    total = args.batch * n
    base = times[next(iter(times))]
    shape = args.preset or f"hidden {args.hidden}, {args.layers} layers"
    setting = (f"{shape}, {args.dtype}, {args.batch} prompts of {args.length} tokens (left-padded), "
               f"{n} new tokens each, {args.device}")
    print(f"greedy generation: {setting}; tokens identical across the three ways: {100 * agree:.0f}%")
    print(f"{'way':<28}{'seconds':>10}{'tokens/s':>12}{'vs batched':>12}")
    for name, t in times.items():
        print(f"{name:<28}{t:>10.2f}{total / t:>12.1f}{t / base:>11.1f}x")
    if args.json:
        (t_batch, t_one, t_nocache) = times.values()
        write_rows(args.json, [{"check": "batched generation", "setting": setting,
                                "result": f"{total / t_batch:,.0f} new tokens/s batched; one prompt at a time "
                                          f"{t_one / t_batch:.1f}x slower, no KV cache {t_nocache / t_batch:.1f}x; "
                                          f"same tokens {100 * agree:.0f}%",
                                "tokens_per_s": total / t_batch, "vs_one_by_one": t_one / t_batch,
                                "vs_no_cache": t_nocache / t_batch}])
    tmp.cleanup()


if __name__ == "__main__":
    main()
