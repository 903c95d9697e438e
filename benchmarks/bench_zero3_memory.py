"""ZeRO-3 memory per worker: parameter + optimizer bytes each rank holds, 1 vs 2 workers.

Builds the LLaRA model (a ~100M-parameter Llama + LoRA + projector, random weights, local
tokenizer) on each rank, wraps it in a DeepSpeed engine from `ds_configs/zero3.json` filled by
`build_ds_config` (the same path `llara-dist train` takes), runs one optimiser step so the optimizer
state exists, and counts the bytes the rank actually holds: parameter partitions (`ds_tensor`)
and optimizer tensors (fp32 master partitions + Adam moments). `--full` trains every weight
instead of LoRA, which makes the optimizer state dominate.

    python benchmarks/bench_zero3_memory.py            # target: 2-worker bytes <= 0.55 x 1-worker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

import torch
import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _rank(rank: int, world: int, port: int, args: dict, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed

    from llara_dist.config import load_config
    from llara_dist.model.llara import build_model, load_tokenizer
    from llara_dist.train.ds_config import build_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    h, layers = args["hidden"], args["layers"]
    cfg = load_config(None, [f"model.tiny.hidden_size={h}", f"model.tiny.num_hidden_layers={layers}",
                             f"model.tiny.num_attention_heads={h // 64}", f"model.tiny.intermediate_size={4 * h}",
                             f"model.tiny.vocab_size={args['vocab']}", "train.micro_batch_size=1"])
    titles = [f"Item {i} {w}" for i, w in enumerate(("alpha beta gamma delta epsilon zeta eta theta iota "
                                                     "kappa lambda mu nu xi omicron pi rho sigma tau").split() * 200)]
    tok = load_tokenizer(cfg.model, titles)
    model = build_model(cfg, tok, rec_dim=64)
    if args["full"]:
        model.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds = build_ds_config(cfg, world_size=world, total_steps=10, hidden_size=h)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10 * h
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)

    ids = torch.randint(0, len(tok) - 8, (1, 64))
    out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), slots=torch.full_like(ids, -1),
                 batch_items=torch.empty(0, dtype=torch.long), item_table=torch.zeros(1, 64), labels=ids)
    engine.backward(out.loss)
    engine.step()

    # A partitioned parameter's full data is released (numel 0) and its partition is `ds_tensor`;
    # small ones under stage3_param_persistence_threshold stay whole on every rank.
    param_bytes = sum(_tensor_bytes(p.ds_tensor if p.numel() == 0 and hasattr(p, "ds_tensor") else p)
                      for p in engine.module.parameters())
    opt = engine.optimizer
    optim_bytes = sum(_tensor_bytes(t) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    inner = getattr(opt, "optimizer", opt)
    optim_bytes += sum(_tensor_bytes(v) for state in inner.state.values() for v in state.values())
    with open(out_path + f".{rank}", "w") as f:
        json.dump({"params": param_bytes, "optim": optim_bytes, "n_params": n_params}, f)


def measure(world: int, args: dict) -> list[dict]:
    out = tempfile.mktemp(prefix="bench-zero3-")
    mp.spawn(_rank, args=(world, random.randint(20000, 40000), args, out), nprocs=world)
    return [json.load(open(out + f".{r}")) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--full", action="store_true", help="train every weight (optimizer state dominates)")
    a = ap.parse_args()
    args = {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "full": a.full}
    res = {w: measure(w, args) for w in (1, 2)}
    n = res[1][0]["n_params"]
    print(f"\nLLaRA model: {n / 1e6:.1f}M parameters ({'full fine-tuning' if a.full else 'LoRA + projector'}), "
          f"ZeRO-3, fp32\n")
    print("| workers | rank | parameter MiB | optimizer MiB | total MiB | vs 1 worker |")
    print("|---|---|---|---|---|---|")
    base = res[1][0]["params"] + res[1][0]["optim"]
    worst = 0.0
    for w, ranks in res.items():
        for r, m in enumerate(ranks):
            tot = m["params"] + m["optim"]
            worst = max(worst, tot / base) if w == 2 else worst
            print(f"| {w} | {r} | {m['params'] / 2**20:.1f} | {m['optim'] / 2**20:.2f} | {tot / 2**20:.1f} | "
                  f"{tot / base:.3f}x |")
    print(f"\nlargest 2-worker rank holds {worst:.3f}x the 1-worker bytes (target <= 0.55x): "
          f"{'PASS' if worst <= 0.55 else 'FAIL'}")


if __name__ == "__main__":
    main()
