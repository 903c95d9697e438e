"""Data-path throughput: shard write rate and stream -> prompt -> tokenize -> collate per CPU core.

    python benchmarks/bench_data.py            # ~1 minute on one core
    python benchmarks/bench_data.py --users 20000 --items 3000 --vocab-size 32000

The tokenizer is a Llama-sized (32k) byte-fallback BPE with a SentencePiece-style metaspace,
trained here on the item titles, the prompt templates and a generated vocabulary of pseudo-words
(no downloads). Everything runs in this one process with one torch thread and no tokenizer
parallelism, and rates are divided by the process's CPU time, so "per core" is what one
DataLoader worker or one rank's main thread delivers. Target: >= 150 samples/s per core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llara_dist.config import load_config  # noqa: E402
from llara_dist.data.collate import TrainCollator  # noqa: E402
from llara_dist.data.prepare import prepare_shards  # noqa: E402
from llara_dist.data.prompts import TEMPLATES, build_prompt  # noqa: E402
from llara_dist.data.samples import split_samples  # noqa: E402
from llara_dist.data.shards import load_meta, load_titles, write_split  # noqa: E402
from llara_dist.data.sources import generate_synthetic  # noqa: E402
from llara_dist.data.stream import TrainStream  # noqa: E402
from llara_dist.data.tokenizer import prepare_tokenizer  # noqa: E402


def llama_sized_tokenizer(titles: list[str], vocab_size: int, seed: int = 0):
    """A 32k-vocabulary metaspace BPE with byte fallback (the Llama-2 tokenizer's shape)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    syll = [a + b for a in "b c d f g h k l m n p r s t v w z br st tr pl ch sh".split() for b in
            "a e i o u ai ea ou ar er or an en in on".split()]
    words = {"".join(rng.choice(syll, size=rng.integers(1, 5))) for _ in range(120_000)}
    words = sorted(words)
    corpus = list(titles) + [t.format(history="", candidates="", n=20) for ts in TEMPLATES.values() for t in ts]
    zipf = rng.zipf(1.3, size=400_000) % len(words)
    corpus += [" ".join(words[i] for i in zipf[j:j + 12]) for j in range(0, len(zipf), 12)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                prepend_scheme="first")])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False, max_token_length=16)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(fast)


def cpu_rate(n: int, fn) -> tuple[float, float]:
    """(n / CPU seconds, n / wall seconds) of running fn()."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return n / (time.process_time() - c0), n / (time.perf_counter() - w0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=150, help="micro-batches timed per stage")
    args = ap.parse_args()
    torch.set_num_threads(1)

    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        cfg = load_config(None, [f"prepare.users={args.users}", f"prepare.items={args.items}"])
        data = generate_synthetic(args.users, args.items, 0)
        meta = prepare_shards(data, cfg.prepare, out, progress=False)

        # shard write rate: the train split again, into a scratch directory
        train, _ = split_samples(data.sequences, history_len=10, min_history=3)
        train = train["train"]
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        cpu, wall = cpu_rate(len(train), lambda: write_split(scratch, "train", train, 2000))
        mb = sum(p.stat().st_size for p in scratch.glob("*.tar")) / 1e6
        rows.append(("shard write (tar + sha256)", f"{cpu:,.0f}", f"{wall:,.0f}",
                     f"{mb * wall / len(train):.1f} MB/s, {mb / len(train) * 1e6:.0f} B/sample"))

        t0 = time.perf_counter()
        titles = load_titles(out)
        tok = llama_sized_tokenizer(titles, args.vocab_size)
        tok_s = time.perf_counter() - t0
        meta = load_meta(out)
        collate = TrainCollator(tok, max_length=4096)
        n = args.batches * args.batch_size

        def stream(ws: int = 1):
            return iter(TrainStream(out, batch_size=args.batch_size, rank=0, world_size=ws, seed=0,
                                    shuffle_buffer=1000, num_candidates=meta["num_candidates"]))

        def run(stages: str, ws: int = 1):
            it = stream(ws)
            for batch in islice(it, args.batches):
                if stages == "stream":
                    continue
                prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in batch]
                if stages == "prompt":
                    continue
                collate(prompts)

        for label, stages, ws in [("stream (read, shuffle, decode, candidates)", "stream", 1),
                                  ("stream, rank 0 of 8 (reads 8x the bytes)", "stream", 8),
                                  ("stream -> prompt", "prompt", 1),
                                  ("stream -> prompt -> tokenize -> collate", "collate", 1),
                                  ("  same, rank 0 of 8", "collate", 8)]:
            cpu, wall = cpu_rate(n, lambda: run(stages, ws))
            rows.append((label, f"{cpu:,.0f}", f"{wall:,.0f}", ""))
        sample = next(stream())
        lengths = collate([build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in sample])
        tokens = float(lengths["attention_mask"].sum(1).float().mean())

    print(f"\nllara-dist data path ({args.users} users, {args.items} items, {meta['counts']['train']:,} train "
          f"samples; tokenizer vocab {len(tok):,}, built in {tok_s:.1f}s; ~{tokens:.0f} tokens/sample; "
          f"micro-batch {args.batch_size})\n")
    head = ("stage", "samples/s per core (CPU time)", "samples/s (wall)", "notes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    full = float(rows[4][1].replace(",", ""))
    print(f"\ntarget >= 150 samples/s per core for the full path: {'MET' if full >= 150 else 'NOT MET'} ({full:,.0f})")


if __name__ == "__main__":
    main()
