"""Data-path throughput (shard write, stream -> prompt -> tokenize -> collate per CPU core) and the
training stream's I/O: bytes read per rank at 1, 2 and 8 ranks, and the time to resume at 15M of 20M.

    python benchmarks/bench_data.py            # ~6 minutes on one core
    python benchmarks/bench_data.py --users 20000 --items 3000 --vocab-size 32000
    python benchmarks/bench_data.py --io-only --io-samples 4000000 --resume-samples 20000000

I/O part: the data sets are built from ONE real shard of ``--samples-per-shard`` samples, hard-linked
under as many shard names as needed (the same sha256 in every meta.json entry), so 20M samples
cost 2 MB of disk. The stream cannot tell: it lists, reads and hashes every shard it needs by name,
and ``bytes_read`` counts exactly what it asked storage for. What it does not show is cold-storage
latency: the one file stays in the page cache, so times are CPU-bound (reported as CPU and wall).

The tokenizer is a Llama-sized (32k) byte-fallback BPE with a SentencePiece-style metaspace,
trained here on the item titles, the prompt templates and a generated vocabulary of pseudo-words
(no downloads). Everything runs in this one process with one torch thread and no tokenizer
parallelism, and rates are divided by the process's CPU time, so "per core" is what one
DataLoader worker or one rank's main thread delivers. Target: >= 150 samples/s per core.
"""

from __future__ import annotations

import argparse
import math
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
from llara_dist.data.shards import load_meta, load_titles, tar_bytes, write_split  # noqa: E402
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


def linked_shards(src: Path, out: Path, n_samples: int, per_shard: int) -> Path:
    """A shard directory of `n_samples` train samples: one real shard, hard-linked per shard name."""
    import hashlib
    import json

    meta = json.loads((src / "meta.json").read_text())
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_items = meta["n_items"]
    samples = [{"key": f"u{i}-t{i % 50}", "user": i, "history": rng.integers(0, n_items, 10).tolist(),
                "target": int(rng.integers(0, n_items))} for i in range(per_shard)]
    data = tar_bytes(samples)
    (out / "template.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    n_shards = n_samples // per_shard
    entries = []
    for i in range(n_shards):
        name = f"train-{i:06d}.tar"
        os.link(out / "template.bin", out / name)
        entries.append({"name": name, "sha256": digest, "samples": per_shard})
    meta["shards"]["train"] = entries
    meta["counts"]["train"] = n_shards * per_shard
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "items.jsonl").write_bytes((src / "items.jsonl").read_bytes())
    return out


def stream_io(src: Path, tmp: Path, args) -> None:
    """Bytes read per rank over one epoch at 1, 2 and 8 ranks; resume time at 15M of 20M."""
    per = args.samples_per_shard
    io_dir = linked_shards(src, tmp / "io", args.io_samples, per)
    shard_bytes = (io_dir / "template.bin").stat().st_size
    total = shard_bytes * (args.io_samples // per)
    print(f"\nbytes read per rank over one epoch: {args.io_samples:,} samples in {args.io_samples // per:,} "
          f"shards of {per:,} ({total / 1e9:.2f} GB), micro-batch {args.batch_size}, shuffle block 1000\n")
    print("ranks | bytes/rank max | mean | total/world | target 1.2 x total/world + 1 shard | met | "
          "read amplification (sum/total) | CPU s per rank-epoch (mean)")
    print("-|-|-|-|-|-|-|-")
    for world in (1, 2, 8):
        got, cpu = [], []
        for rank in range(world):
            s = TrainStream(io_dir, batch_size=args.batch_size, rank=rank, world_size=world, seed=0,
                            shuffle_buffer=1000, num_candidates=20)
            c0 = time.process_time()
            for _ in s._rank_batches(0, 0):  # the real read path, without JSON decoding
                pass
            cpu.append(time.process_time() - c0)
            got.append(s.bytes_read)
        bound = 1.2 * total / world + shard_bytes
        print(f"{world} | {max(got) / 1e6:,.1f} MB | {np.mean(got) / 1e6:,.1f} MB | {total / world / 1e6:,.1f} MB | "
              f"{bound / 1e6:,.1f} MB | {'yes' if max(got) <= bound else 'NO'} | {sum(got) / total:.3f} | "
              f"{np.mean(cpu):.1f}")

    n = args.resume_samples
    res_dir = linked_shards(src, tmp / "resume", n, per)
    at = int(n * 0.75)
    print(f"\nresume at sample {at:,} of {n:,} ({n // per:,} shards, {shard_bytes * (n // per) / 1e9:.1f} GB): "
          "construct the stream (meta.json + one directory listing), load the state, first batch\n")
    print("ranks | rank | wall s (construct + seek + first batch) | CPU s | bytes read | "
          "+ until all R/world ranges are open: wall s | CPU s | bytes read | "
          "a re-read of the epoch so far would read")
    print("-|-|-|-|-|-|-|-|-")
    for world in (1, 8):
        gb = world * args.batch_size
        offset = at // gb * gb
        for rank in sorted({0, world - 1}):
            w0, c0 = time.perf_counter(), time.process_time()
            s = TrainStream(res_dir, batch_size=args.batch_size, rank=rank, world_size=world, seed=0,
                            shuffle_buffer=1000, num_candidates=20)
            s.load_state_dict({"epoch": 0, "offset": offset, "ranges": s.ranges, "block": 1000})
            it = iter(s)
            batch = next(it)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            first_bytes = s.bytes_read
            assert len(batch) == args.batch_size and s.state_dict()["offset"] == offset + gb
            # every range of the rank holds one of its next R/world positions: open them all
            for _ in range(-(-s.ranges // math.gcd(world, s.ranges) // args.batch_size)):
                next(it)
            wall2, cpu2 = time.perf_counter() - w0, time.process_time() - c0
            print(f"{world} | {rank} | {wall:.2f} | {cpu:.2f} | {first_bytes / 1e6:,.0f} MB | {wall2:.2f} | "
                  f"{cpu2:.2f} | {s.bytes_read / 1e6:,.0f} MB | {offset * shard_bytes / per / 1e9:,.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--io-only", action="store_true", help="only the stream I/O tables")
    ap.add_argument("--io-samples", type=int, default=1_000_000, help="data set size for bytes per rank")
    ap.add_argument("--resume-samples", type=int, default=20_000_000, help="data set size for the resume time")
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)

    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        cfg = load_config(None, [f"prepare.users={args.users}", f"prepare.items={args.items}"])
        data = generate_synthetic(args.users, args.items, 0)
        meta = prepare_shards(data, cfg.prepare, out, progress=False)
        stream_io(out, Path(tmp), args)
        if args.io_only:
            return

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

        def stream(ws: int = 1) -> TrainStream:
            return TrainStream(out, batch_size=args.batch_size, rank=0, world_size=ws, seed=0,
                               shuffle_buffer=1000, num_candidates=meta["num_candidates"])

        def run(stages: str, ws: int = 1):
            # One whole epoch of the rank: the first batches open every canonical range's block
            # (reading R/world shards), so a short window would time that warm-up, not the average.
            st = stream(ws)
            for batch in islice(iter(st), st.batches_per_epoch):
                if stages == "stream":
                    continue
                prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in batch]
                if stages == "prompt":
                    continue
                collate(prompts)

        for label, stages, ws in [("stream (read, shuffle, decode, candidates)", "stream", 1),
                                  ("stream, rank 0 of 8 (reads 1/8 of the bytes)", "stream", 8),
                                  ("stream -> prompt", "prompt", 1),
                                  ("stream -> prompt -> tokenize -> collate", "collate", 1),
                                  ("  same, rank 0 of 8", "collate", 8)]:
            n = stream(ws).batches_per_epoch * args.batch_size
            cpu, wall = cpu_rate(n, lambda: run(stages, ws))
            rows.append((label, f"{cpu:,.0f}", f"{wall:,.0f}", f"one epoch of the rank: {n:,} samples"))
        s0 = stream()
        t0 = time.perf_counter()
        next(iter(s0))
        first = time.perf_counter() - t0
        sample = next(iter(stream()))
        lengths = collate([build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in sample])
        tokens = float(lengths["attention_mask"].sum(1).float().mean())

    print(f"\nllara-dist data path ({args.users} users, {args.items} items, {meta['counts']['train']:,} train "
          f"samples; tokenizer vocab {len(tok):,}, built in {tok_s:.1f}s; ~{tokens:.0f} tokens/sample; "
          f"micro-batch {args.batch_size}; first batch after {first:.2f}s)\n")
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
