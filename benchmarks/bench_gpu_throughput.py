"""Training throughput per GPU: tokens/s and MFU of the LLaRA step under DeepSpeed.

Builds the model of a config (e.g. `configs/movielens.yaml` with a local Llama-2-7B path), wraps
it in the DeepSpeed engine `llara-dist train` would build (`build_ds_config` from the config's
`train.ds_config`), and times optimiser steps on fixed hybrid batches of `--length` tokens with
30 injected items per sample. Launch one process per GPU:

    torchrun --nproc_per_node 8 benchmarks/bench_gpu_throughput.py --config configs/movielens.yaml
    python benchmarks/bench_gpu_throughput.py --config configs/tiny.yaml      # 1 GPU
    python benchmarks/bench_gpu_throughput.py --random-init --config configs/movielens.yaml \
        train.ds_config=ds_configs/zero2.json                                 # Llama-2-7B shape, no weights

`--random-init` builds the `--preset` architecture (default Llama-2-7B) with random weights from a
config-only checkout (`_models.py`): tokens/s and MFU do not depend on the weights' values.
Without CUDA it prints that and exits (`--device cpu` runs the same code on CPU; `--smoke` is the
tiny preset on CPU, as the test suite runs it).
MFU counts LoRA training FLOPs per token as 4 x N_base (forward + activation gradients; the frozen
base has no weight gradients) + 8 x layers x length x hidden (attention), against `--peak-tflops`
(default 989: H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _models import bench_titles, random_model_overrides
from _timing import write_rows


def _free_port() -> int:
    # A fixed default port collides with any other process group on the machine (EADDRINUSE).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--length", type=int, default=512, help="tokens per sample")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--random-init", action="store_true", help="random weights of --preset (no checkpoint needed)")
    ap.add_argument("--preset", default="llama2-7b", help="architecture for --random-init (see _models.PRESETS)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on CPU, 2 steps: checks the script runs")
    ap.add_argument("--json", help="also write the result row as JSON here")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.random_init, a.preset, a.steps, a.warmup, a.length = "cpu", True, "smoke", 2, 1, 64

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_throughput: no CUDA device here; run it on a GPU node (or --device cpu for a smoke check)")
        return
    if a.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from llara_dist.config import load_config
    from llara_dist.model.llara import build_model, load_tokenizer
    from llara_dist.train.driver import _hidden_size
    from llara_dist.train.ds_config import build_ds_config

    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(var, default)
    deepspeed.init_distributed(dist_backend="nccl" if a.device == "cuda" else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    overrides = list(a.overrides) + [f"scaling.use_gpu={a.device == 'cuda'}"]
    tmp = tempfile.TemporaryDirectory(prefix="bench-gpu-")
    if a.random_init:
        overrides = random_model_overrides(a.preset, tmp.name, "bfloat16") + overrides
    cfg = load_config(a.config, overrides)
    tok = load_tokenizer(cfg.model, bench_titles())
    hidden = _hidden_size(cfg)
    ds = build_ds_config(cfg, world_size=world, total_steps=10_000, hidden_size=hidden)
    # Built on the device: a random 7B initialises in seconds there, in minutes on the host.
    with torch.device(f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else "cpu"):
        model = build_model(cfg, tok, rec_dim=64, ds_config=ds)
    n_base = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if not p.requires_grad)
    n_layers = model.lm.get_base_model().config.num_hidden_layers
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    dev = engine.device
    B, L = cfg.train.micro_batch_size, a.length
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, len(tok) - 8, (B, L), generator=g)
    slots = torch.full((B, L), -1, dtype=torch.long)
    slots[:, 1:31] = torch.arange(30).repeat(B, 1)
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "slots": slots.to(dev),
             "batch_items": torch.arange(30), "item_table": torch.randn(64, 64, generator=g), "labels": ids.to(dev)}

    def step() -> float:
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()
    t = statistics.median(step() for _ in range(a.steps))
    tokens = B * L * cfg.train.grad_accum
    tps = tokens / t
    flops_per_token = 4 * n_base + 8 * n_layers * L * hidden
    mfu = flops_per_token * tps / (a.peak_tflops * 1e12)
    mem = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None
    if rank == 0:
        name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
        model_name = f"random {a.preset}" if a.random_init else cfg.model.name_or_path
        ds_name = os.path.basename(cfg.train.ds_config)
        print(f"\n{model_name}: {n_base / 1e9:.2f}B base parameters, {ds_name}, {cfg.model.dtype}, "
              f"LoRA r{cfg.lora.r}, gradient checkpointing {cfg.model.gradient_checkpointing}, "
              f"{cfg.model.attn_implementation or 'default'} attention, {world} x {name}\n")
        print("| micro batch x accum | tokens/sample | step s | tokens/s per device | MFU | peak GiB |")
        print("|---|---|---|---|---|---|")
        print(f"| {B} x {cfg.train.grad_accum} | {L} | {t:.3f} | {tps:.0f} | "
              f"{100 * mfu:.1f}% | {'-' if mem is None else f'{mem:.1f}'} |")
        if a.json:
            setting = (f"{model_name}, {ds_name}, {cfg.model.dtype}, LoRA r{cfg.lora.r}, micro {B} x accum "
                       f"{cfg.train.grad_accum} x {L} tokens, {world} x {name}")
            result = f"{tps:,.0f} tokens/s, MFU {100 * mfu:.1f}%, step {t:.2f} s" + ("" if mem is None else f", peak {mem:.1f} GiB")
            write_rows(a.json, [{"check": "training step (LoRA)", "setting": setting, "result": result,
                                 "tokens_per_s": tps, "mfu": mfu, "step_s": t, "peak_gib": mem}])
    tmp.cleanup()


if __name__ == "__main__":
    main()
