"""A "warm" tiny base: the tiny preset trained as a plain causal LM, saved as a local HF checkpoint.

LLaRA fine-tunes a *pretrained* LLM (Llama-2-7B) that already reads and writes titles; only LoRA
and the projector train. A randomly initialised tiny Llama cannot be taught to write titles
through LoRA alone on CPU budgets, so this module gives it what a pretrained model brings: one
short, single-process PyTorch run that trains ALL of the tiny model's parameters on the train
split's text-only prompts followed by their answers (the text the paper's LLM sees in its
text-only curriculum stage). The loss covers every token, prompt and answer alike, so the model
learns the catalogue's titles and the prompt format, not only the answers.

Honest caveat: this base has seen the train split's targets, so it is already a text-only
recommender of sorts; compare LLaRA variants that all start from the same warm base. Valid and
test samples are never read.

The result is ``save_pretrained`` weights + tokenizer files; ``model.name_or_path: DIR`` then loads
it through the same local-checkpoint path as a real Llama.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from llara_dist.config import Config, PretrainConfig, save_config
from llara_dist.data.collate import IGNORE_INDEX, TrainCollator
from llara_dist.data.prompts import build_prompt
from llara_dist.data.samples import train_candidates
from llara_dist.data.shards import load_meta, load_titles, read_split
from llara_dist.errors import ConfigError, DataError

SUMMARY_NAME = "pretrain_summary.json"


def _batches(samples: list[dict], titles: list[str], cfg: Config, domain: str, n_items: int,
             num_candidates: int, negatives: str = "unseen") -> Iterator[list]:
    """Endless shuffled batches of text-only prompts; candidates redrawn every epoch, as in training."""
    p = cfg.pretrain
    rng = random.Random(p.seed)
    epoch = 0
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order) - p.batch_size + 1, p.batch_size):
            batch = []
            for i in order[start:start + p.batch_size]:
                s = dict(samples[i])
                s["candidates"] = train_candidates(s, n_items, num_candidates, p.seed, epoch, negatives=negatives)
                batch.append(build_prompt(s, titles, mode="text", domain=domain, seed=p.seed))
            yield batch
        epoch += 1


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to lr/100."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def _lm_batch(collator: TrainCollator, prompts: list) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS tokenised exactly as LLaRA training does, labelled on every real token."""
    batch = collator(prompts)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def fit_causal_lm(model: torch.nn.Module, tokenizer, batches: Iterator[list], p: PretrainConfig,
                  max_length: int, *, progress: bool = True) -> list[float]:
    """Train every parameter of ``model`` as a causal LM on ``p.steps`` batches of prompts (+ answers).

    AdamW with `lr_at`'s schedule and ``p``'s settings; returns the loss of every step.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    collator = TrainCollator(tokenizer, max_length)
    losses: list[float] = []
    bar = tqdm(range(p.steps), desc="pretrain-base", disable=not progress, mininterval=5, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p.steps, p.warmup_steps, p.lr)
        batch = _lm_batch(collator, next(batches))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def pretrain_base(cfg: Config, out_dir: str | Path | None = None, *, progress: bool = True) -> dict:
    """Train the tiny preset on the train split's text-only prompts; save a HF checkpoint to ``out_dir``.

    Returns (and writes to ``OUT/pretrain_summary.json``) the first/last losses and timings.
    """
    from llara_dist.model.llara import load_tokenizer
    from llara_dist.model.tiny import build_tiny_llama

    if cfg.model.name_or_path != "tiny":
        raise ConfigError(f"model.name_or_path: pretrain-base builds the 'tiny' preset, got "
                          f"{cfg.model.name_or_path!r} (a real checkpoint is already pretrained)")
    out = Path(out_dir or cfg.pretrain.out)
    p = cfg.pretrain
    meta = load_meta(cfg.data.shards)
    titles = load_titles(cfg.data.shards)
    domain = cfg.data.domain or meta["domain"]
    samples = list(read_split(cfg.data.shards, "train"))
    if len(samples) < p.batch_size:
        raise DataError(f"{cfg.data.shards}: {len(samples)} train samples, fewer than "
                        f"pretrain.batch_size={p.batch_size}")

    # The tokenizer the tiny preset would build anyway (trained on these titles), saved with the
    # model so loading the checkpoint gives the same ids.
    tokenizer = load_tokenizer(cfg.model, titles)
    dtype = getattr(torch, cfg.model.dtype)
    # Starts from the same seeded random weights as the plain tiny preset (model.tiny.seed).
    model = build_tiny_llama(cfg.model.tiny, tokenizer, len(tokenizer), dtype, cfg.model.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    batches = _batches(samples, titles, cfg, domain, int(meta["n_items"]), int(meta["num_candidates"]),
                       meta.get("negatives", "unseen"))
    t0 = time.perf_counter()
    losses = fit_causal_lm(model, tokenizer, batches, p, cfg.data.max_length, progress=progress)
    seconds = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_config(cfg, out / "pretrain_config.yaml")
    k = min(10, len(losses))
    summary = {"steps": p.steps, "batch_size": p.batch_size, "train_samples": len(samples),
               "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
               "seconds": round(seconds, 1), "parameters": sum(t.numel() for t in model.parameters()),
               "shards": str(cfg.data.shards), "losses": losses}
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    return summary
