"""Can this LLM learn to read the injected item embeddings at all?

A controlled task where the answer is decided by the embeddings alone, so the text cannot help:

- a catalogue of items with made-up two-word titles (the words say nothing about the item) and a
  random Gaussian item table standing in for the frozen recommender;
- each sample has 10 history items and C candidates; the target is the candidate whose embedding
  has the largest dot product with the mean history embedding (the "table read-out" rule);
- LLaRA trains on hybrid prompts (the project's prompts, collator, model, LoRA and projector) and
  is scored by ranking the candidates by the likelihood of their titles (score decoding).

A model that uses the embeddings scores far above chance (1/C) and falls back to chance when the
table's rows are shuffled at evaluation. One that ignores them sits at chance both ways. This is
the question behind the ML-100K quality gap (`quality_ml100k.py`: hybrid = text-only, and the same
with shuffled rows), asked without the text-only prior that real titles allow.

    python benchmarks/probe_embedding_use.py                       # the tiny preset, CPU
    python benchmarks/probe_embedding_use.py --steps 3000 model.tiny.num_hidden_layers=4
    python benchmarks/probe_embedding_use.py --device cuda model.name_or_path=/models/llama-2-7b \\
        model.dtype=bfloat16 train.lr=2e-4

Single process, plain PyTorch training loop (no Ray, no DeepSpeed): it probes the model, not the
distributed system, and runs wherever the model fits.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llara_dist.config import load_config
from llara_dist.data.collate import GenerationCollator, TrainCollator
from llara_dist.data.prompts import build_prompt
from llara_dist.eval.decoding import continuation_logprobs
from llara_dist.eval.evaluate import answer_token_ids, causal_lm
from llara_dist.eval.metrics import wilson_interval
from llara_dist.model.llara import build_model, load_tokenizer
from llara_dist.model.warm_base import lr_at

ROOT = Path(__file__).resolve().parents[1]

ADJECTIVES = ("amber azure bitter bold brave bright broken calm cold crimson dark deep distant dry "
              "early empty fallen final frozen gentle golden green hidden hollow iron last lonely lost "
              "lucky quiet rapid red restless secret silent silver small strange sudden wild").split()
NOUNS = ("anchor arrow autumn bridge canyon castle circle comet crown desert dream echo empire "
         "engine falcon forest garden harbor island journey kingdom lantern meadow mirror mountain "
         "ocean orchard planet prairie river shadow signal spirit storm summer temple thunder tower "
         "valley voyage winter").split()


def make_catalogue(n_items: int, dim: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n_items`` distinct uninformative titles and a ``[n_items + 1, dim]`` table (last row: padding)."""
    rng = random.Random(seed)
    pairs = [f"{a} {b}".title() for a in ADJECTIVES for b in NOUNS]
    if n_items > len(pairs):
        raise SystemExit(f"--items: at most {len(pairs)} distinct titles, got {n_items}")
    rng.shuffle(pairs)
    table = np.random.default_rng(seed).standard_normal((n_items + 1, dim)).astype(np.float32)
    table[-1] = 0.0
    return pairs[:n_items], table


def make_samples(n: int, table: np.ndarray, num_candidates: int, seed: int, prefix: str) -> list[dict]:
    """Samples whose target is the candidate closest (dot product) to the mean history embedding."""
    rng = np.random.default_rng(seed)
    n_items = table.shape[0] - 1
    out = []
    for i in range(n):
        items = rng.choice(n_items, 10 + num_candidates, replace=False)
        history, candidates = items[:10], items[10:]
        target = candidates[int(np.argmax(table[candidates] @ table[history].mean(0)))]
        out.append({"key": f"{prefix}{i}", "history": history.tolist(), "candidates": candidates.tolist(),
                    "target": int(target)})
    return out


def warm_tiny_base(cfg, titles: list[str], samples: list[dict], steps: int, out: Path) -> list[float]:
    """What `llara-dist pretrain-base` does for ML-100K, on the probe's catalogue: every parameter of
    the tiny preset trained as a causal LM on text-only prompts + answers, saved as a local HF
    checkpoint. LoRA on the random preset cannot even learn to write a title (loss ~3 after 1,500
    steps), which would make the probe's answer trivial."""
    from llara_dist.model.tiny import build_tiny_llama
    from llara_dist.model.warm_base import fit_causal_lm

    tokenizer = load_tokenizer(cfg.model, titles)
    model = build_tiny_llama(cfg.model.tiny, tokenizer, len(tokenizer), getattr(torch, cfg.model.dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    batch = cfg.pretrain.batch_size

    def batches():
        while True:
            for i in range(0, len(samples) - batch + 1, batch):
                yield [build_prompt(s, titles, mode="text", domain="movie", seed=0) for s in samples[i:i + batch]]

    losses = fit_causal_lm(model, tokenizer, batches(), cfg.pretrain.model_copy(update={"steps": steps}),
                           max_length=4096, progress=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses


@torch.no_grad()
def score_hits(model, tokenizer, samples, titles, table, device) -> list[bool]:
    """Score decoding as `llara-dist eval --decoding score` does it: each prompt runs once and its
    candidates' titles are scored over the shared KV cache; the best-scored candidate is the answer."""
    collate = GenerationCollator(tokenizer, max_length=4096)
    lm, pad_id = causal_lm(model), int(tokenizer.pad_token_id)
    answers = {}
    hits = []
    model.eval()
    for s in samples:
        b = collate([build_prompt(s, titles, mode="hybrid", domain="movie", seed=0)])
        b = {k: v.to(device) for k, v in b.items()}
        embeds = model.embed(b["input_ids"], b["slots"], b["batch_items"], table)[0]
        seqs = [answers.setdefault(c, answer_token_ids(tokenizer, titles[c])) for c in s["candidates"]]
        scores = continuation_logprobs(lm, embeds, seqs, pad_id=pad_id)
        hits.append(s["candidates"][int(np.argmax(scores))] == s["target"])
    model.train()
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--dim", type=int, default=32, help="width of the random item table")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--warm-base-steps", type=int, default=2000,
                    help="tiny preset only: causal-LM steps on the probe's text prompts first (0: random base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (model.*, lora.*, train.lr, train.seed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, ["data.max_length=4096", *args.overrides])
    titles, table_np = make_catalogue(args.items, args.dim, cfg.train.seed)
    train = make_samples(args.steps * args.batch_size, table_np, args.candidates, cfg.train.seed + 1, "train-")
    test = make_samples(args.eval_samples, table_np, args.candidates, cfg.train.seed + 2, "test-")
    device = torch.device(args.device)
    table = torch.tensor(table_np, device=device)
    perm = torch.randperm(args.items, generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
    shuffled = table.clone()
    shuffled[:-1] = table[:-1][perm]

    warm = ""
    if cfg.model.name_or_path == "tiny" and args.warm_base_steps > 0:
        t0 = time.perf_counter()
        base_dir = Path(tempfile.mkdtemp(prefix="probe-warm-base-"))
        warm_losses = warm_tiny_base(cfg, titles, train, args.warm_base_steps, base_dir)
        warm = (f"; warm base {args.warm_base_steps} steps ({time.perf_counter() - t0:.0f} s, LM loss "
                f"{np.mean(warm_losses[-50:]):.3f})")
        print(warm[2:], flush=True)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(base_dir)})})
    tokenizer = load_tokenizer(cfg.model, titles)
    model = build_model(cfg, tokenizer, rec_dim=args.dim).to(device)
    if warm:
        shutil.rmtree(cfg.model.name_or_path)  # loaded; the checkpoint is not needed any more
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    collate = TrainCollator(tokenizer, max_length=4096)
    print(f"model {cfg.model.name_or_path}: {sum(p.numel() for p in params):,} trainable parameters; "
          f"{args.steps} steps x {args.batch_size}, lr {cfg.train.lr}", flush=True)

    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, min(50, max(1, args.steps // 10)), cfg.train.lr)
        chunk = train[step * args.batch_size:(step + 1) * args.batch_size]
        prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in chunk]
        b = {k: v.to(device) for k, v in collate(prompts).items()}
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], slots=b["slots"],
                     batch_items=b["batch_items"], item_table=table, labels=b["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {step + 1}/{args.steps}  loss {np.mean(losses[-50:]):.3f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    n = len(test)
    rows = []
    for name, t in (("real table", table), ("table rows shuffled", shuffled)):
        hits = score_hits(model, tokenizer, test, titles, t, device)
        lo, hi = wilson_interval(sum(hits), n)
        rows.append((name, sum(hits) / n, lo, hi))
    chance = 1 / args.candidates
    print(f"\nEmbedding-use probe: {n} test samples, {args.candidates} candidates, target = argmax "
          f"candidate . mean(history); training {train_s:.0f} s, loss {np.mean(losses[:50]):.3f} -> "
          f"{np.mean(losses[-50:]):.3f}{warm}\n")
    print("| evaluated with | score HR@1 [95% CI] |\n|---|---|")
    for name, hr, lo, hi in rows:
        print(f"| {name} | {hr:.3f} [{lo:.3f}, {hi:.3f}] |")
    print(f"| chance (1/{args.candidates}) | {chance:.3f} |")
    used = rows[0][2] > max(chance, rows[1][3])
    print(f"\nuses the embeddings: {'yes' if used else 'no'} (yes = the real-table interval lies above "
          "chance and above the shuffled-table interval)")


if __name__ == "__main__":
    main()
