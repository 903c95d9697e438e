"""Score decoding: the prompt run once with its KV cache shared by all candidates
(`eval.decoding.continuation_logprobs`) against one full prompt + candidate row per candidate.

Same model (random Llama of the given shape + LoRA + projector), same hybrid prompt, 20 candidates
of a few tokens each, as in `llara-dist eval --decoding score`. The two ways' scores are asserted
equal (to float32 rounding) before any time is printed.

    python benchmarks/bench_score.py                         # CPU, a small Llama shape
    python benchmarks/bench_score.py --hidden 1024 --layers 8 --device cuda
    python benchmarks/bench_score.py --preset llama2-7b --dtype bfloat16 --device cuda   # random 7B
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from _models import bench_model_overrides, bench_titles
from _timing import timed, write_rows


def _full_rows(lm, prompt_embeds, sequences, pad_id):
    """The reference: [C, L + T] rows, the prompt repeated for every candidate, one forward (logits
    only for the last T + 1 positions, as a careful implementation would)."""
    n, (plen, _), device = len(sequences), prompt_embeds.shape, prompt_embeds.device
    width = max(len(s) for s in sequences)
    cont = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, plen + width, dtype=torch.long)
    mask[:, :plen] = 1
    for i, s in enumerate(sequences):
        cont[i, : len(s)] = torch.tensor(s)
        mask[i, plen: plen + len(s)] = 1
    cont, mask = cont.to(device), mask.to(device)
    embeds = torch.cat([prompt_embeds.expand(n, -1, -1), lm.get_input_embeddings()(cont).to(prompt_embeds.dtype)], 1)
    logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False, logits_to_keep=width + 1).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
    return (logp * mask[:, plen:]).sum(-1).double().cpu().numpy()


def main() -> None:
    from llara_dist.config import load_config
    from llara_dist.eval.decoding import continuation_logprobs
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
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", help="a real architecture with random weights (_models.PRESETS) instead of --hidden/--layers")
    ap.add_argument("--smoke", action="store_true", help="the smoke preset, 2 prompts: checks the script runs")
    ap.add_argument("--json", help="also write the result rows as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.prompts, args.repeats, args.length = "smoke", 2, 1, 64
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench-score-")
    cfg = load_config(None, bench_model_overrides(args.preset, tmp.name, args.dtype, args.hidden, args.layers))
    tok = load_tokenizer(cfg.model, bench_titles(800))
    with torch.device(args.device):  # a random 7B initialises in seconds on the GPU
        model = build_model(cfg, tok, rec_dim=64).to(args.device).eval()
    lm = model.lm
    g = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(10, len(tok) - 8, (args.length,), generator=g).to(args.device) for _ in range(args.prompts)]
    prompts = [lm.get_input_embeddings()(ids) for ids in prompt_ids]
    cands = [[torch.randint(10, len(tok) - 8, (1 + (c % args.title_tokens),), generator=g).tolist() + [tok.eos_token_id]
              for c in range(args.candidates)] for _ in prompts]
    pad = tok.pad_token_id

    with torch.no_grad():
        cached, t_cached = timed(lambda: [continuation_logprobs(lm, p, c, pad_id=pad) for p, c in zip(prompts, cands)],
                                  args.device, args.repeats)
        full, t_full = timed(lambda: [_full_rows(lm, p, c, pad) for p, c in zip(prompts, cands)],
                              args.device, args.repeats)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(cached, full))
    # Half precision rounds the shared-cache and full-row paths differently; float32 agrees to 1e-3.
    tol = 1e-3 if cfg.model.dtype == "float32" else 0.5
    assert worst < tol, f"cached and full-row scores differ by {worst}"
    same_choice = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(cached, full))
    if cfg.model.dtype == "float32":
        assert same_choice == len(cached)

    shape = args.preset or f"hidden {args.hidden}, {args.layers} layers"
    setting = (f"{shape}, {cfg.model.dtype}, {args.prompts} prompts x {args.candidates} candidates, "
               f"prompt {args.length} tokens, {args.device}")
    print(f"{setting}; best of {args.repeats}; max |score difference| {worst:.1e}; "
          f"same top candidate {same_choice}/{len(cached)}")
    print("| way | seconds | per prompt (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, t in (("prompt + candidate per row", t_full), ("shared prompt KV cache", t_cached)):
        print(f"| {name} | {t:.3f} | {1000 * t / args.prompts:.1f} | {t_full / t:.1f}x |")
    if args.json:
        write_rows(args.json, [{"check": "score decoding", "setting": setting,
                                "result": f"{1000 * t_cached / args.prompts:.1f} ms/prompt shared KV cache vs "
                                          f"{1000 * t_full / args.prompts:.1f} full rows ({t_full / t_cached:.1f}x); "
                                          f"max abs diff {worst:.1e}",
                                "ms_per_prompt": 1000 * t_cached / args.prompts, "speedup": t_full / t_cached}])
    tmp.cleanup()


if __name__ == "__main__":
    main()
