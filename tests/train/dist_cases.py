"""Bodies of the multi-process training-step tests, run as ``python dist_cases.py CASE OUT SHARDS REC``
by every rank of a plain gloo process group (RANK / WORLD_SIZE / MASTER_* set by the test).

Real DeepSpeed engines over the real tiny model, on prompts built from the real shards; no Ray
(process start-up is what these tests would otherwise spend their time on).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[2]


def _setup(shards: str, rec: str, *overrides: str):
    import deepspeed
    import torch

    from llara_dist.config import load_config
    from llara_dist.data.collate import TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.data.shards import load_meta, load_titles, read_split
    from llara_dist.model.llara import as_item_table, build_model, load_tokenizer
    from llara_dist.recommender.table import load_item_table

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.shards={shards}", f"train.rec_dir={rec}",
                                                   "lora.dropout=0", *overrides])
    meta = load_meta(shards)
    titles = load_titles(shards)
    table, _ = load_item_table(rec, meta)
    tokenizer = load_tokenizer(cfg.model, titles)
    collator = TrainCollator(tokenizer, cfg.data.max_length)

    def batch(samples, mode="hybrid"):
        out = collator([build_prompt(s, titles, mode=mode, domain=meta["domain"], seed=0) for s in samples])
        if out["batch_items"].numel() == 0:  # as the worker does for a text batch
            out["batch_items"] = torch.tensor([meta["n_items"]], dtype=torch.long)
        return out

    samples = list(read_split(shards, "valid"))
    return cfg, tokenizer, as_item_table(table), batch, samples, lambda ds: build_model(
        cfg, tokenizer, rec_dim=int(table.shape[1]), ds_config=ds)


def case_rank0_error(out: Path, shards: str, rec: str) -> None:
    """Finding 3: rank 0's storage walk raises an OSError; every rank must raise it, none may hang."""
    import fsspec
    import pyarrow.fs
    import ray.train
    import torch.distributed as dist

    from llara_dist.train.checkpoint import pick_checkpoint

    class Unreachable(pyarrow.fs.FSSpecHandler):
        def get_file_info(self, paths):
            raise OSError("injected: storage unreachable")

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fs = pyarrow.fs.PyFileSystem(Unreachable(fsspec.filesystem("memory")))
    try:
        pick_checkpoint(ray.train.Checkpoint("/run/step_00000010", filesystem=fs), world_size=2, rank=rank)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001
        result = {"error": type(e).__name__, "message": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _snapshot(engine) -> dict:
    """Per optimiser group (world size 1, so a rank's partition is the whole group): the module's
    parameter values, the fp32 master weights, Adam's two moments and its step count."""
    import torch

    opt = engine.basic_optimizer
    snap = {}
    for i, group in enumerate(opt.param_groups):
        flats = _flat_params(engine, i)
        states = [opt.state.get(f, {}) for f in flats]
        names = ["lora", "projector"]
        params = [p for n, p in engine.module.named_parameters()
                  if p.requires_grad and (n.startswith("projector.") == (names[i] == "projector"))]
        snap[group["name"]] = {
            "module": torch.cat([getattr(p, "ds_tensor", p).detach().flatten().clone() for p in params]),
            "master": torch.cat([f.detach().flatten().clone() for f in flats]),
            "exp_avg": torch.cat([s["exp_avg"].flatten().clone() if s else torch.zeros(f.numel())
                                  for s, f in zip(states, flats)]),
            "exp_avg_sq": torch.cat([s["exp_avg_sq"].flatten().clone() if s else torch.zeros(f.numel())
                                     for s, f in zip(states, flats)]),
            "step": sorted({float(s.get("step", 0)) for s in states}),
        }
    return snap


def _flat_params(engine, group: int) -> list:
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of each parameter group
        return [f for sub, f in enumerate(zero.fp32_partitioned_groups_flat) if zero.sub_group_to_group_id[sub] == group]
    return [zero.single_partition_of_fp32_groups[group]]  # ZeRO-1/2


def case_text_step(out: Path, shards: str, rec: str) -> None:
    """Finding 4: hybrid, text (frozen), checkpoint, text, hybrid; then the same from the checkpoint."""
    import torch

    from llara_dist.train.ds_config import build_ds_config
    from llara_dist.train.worker import initialize_engine, train_step

    stage = os.environ["CASE_ZERO"]
    cfg, _, table, batch, samples, model_for = _setup(shards, rec, f"train.ds_config=ds_configs/zero{stage}.json")
    ds = build_ds_config(cfg, world_size=1, total_steps=10, hidden_size=64)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    plan = [("hybrid", 0), ("text", 4), ("text", 8), ("hybrid", 12), ("text", 16)]

    def run(engine, freeze, steps):
        losses, snaps = [], [_snapshot(engine)]
        for mode, at in steps:
            torch.manual_seed(at)
            freeze.active = mode == "text"
            loss, _ = train_step(engine, [batch(samples[at:at + 4], mode)], item_table=table, world=1)
            losses.append(loss)
            snaps.append(_snapshot(engine))
        return losses, snaps

    engine, freeze = initialize_engine(model_for(ds), ds)
    losses, snaps = run(engine, freeze, plan[:2])
    engine.save_checkpoint(str(out / "ckpt"), tag="t2", exclude_frozen_parameters=True)
    more, more_snaps = run(engine, freeze, plan[2:])
    # Control: without the freeze, a text step after a hybrid one moves the projector.
    freeze.active = False
    loss_unfrozen, _ = train_step(engine, [batch(samples[20:24], "text")], item_table=table, world=1)
    unfrozen = _snapshot(engine)

    again, freeze2 = initialize_engine(model_for(ds), ds)
    again.load_checkpoint(str(out / "ckpt"), tag="t2", load_module_strict=False)
    resumed, resumed_snaps = run(again, freeze2, plan[2:])
    torch.save({"losses": losses + more, "resumed": resumed, "snaps": snaps + more_snaps[1:],
                "resumed_snaps": resumed_snaps[1:], "unfrozen": unfrozen, "before_unfrozen": more_snaps[-1]},
               out / "text_step.pt")


def case_grad(out: Path, shards: str, rec: str) -> None:
    """Finding 5: one SGD(lr=1) step over the same global batch of 8 samples, split into micro-batches
    of CASE_MICRO samples over the ranks and accumulation steps; saves the gradient (= -update)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from llara_dist.train.worker import answer_tokens, train_step

    cfg, _, table, batch, samples, model_for = _setup(shards, rec)
    world, rank = dist.get_world_size(), dist.get_rank()
    size = int(os.environ["CASE_MICRO"])
    accum = 8 // (size * world)
    ds = {"train_micro_batch_size_per_gpu": size, "gradient_accumulation_steps": accum,
          "train_batch_size": 8, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    model = model_for(ds)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=1.0), config=ds)

    def micro(k: int) -> dict:
        # The synthetic titles all have the same length: sample i keeps 1..5 of its answer tokens,
        # so answers differ in length as real titles do.
        b = batch(samples[size * k: size * (k + 1)])
        for j, row in enumerate(b["labels"]):
            answer = (row != -100).nonzero().flatten()
            row[answer[1 + (3 * (size * k + j)) % 5:]] = -100
        return b

    # Rank r takes micro-batches r*accum .. r*accum + accum - 1 of the global batch.
    mine = [micro(k) for k in range(rank * accum, (rank + 1) * accum)]
    before = _full(engine)
    loss, _ = train_step(engine, mine, item_table=table, world=world)
    after = _full(engine)
    total = torch.tensor([loss])
    dist.all_reduce(total)
    if rank == 0:
        counts = [answer_tokens(micro(k)) for k in range(8 // size)]
        torch.save({"grad": {k: before[k] - after[k] for k in before}, "loss": float(total), "counts": counts},
                   out / f"grad_{world}x{accum}x{size}.pt")


def _full(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    case, out, shards, rec = sys.argv[1:5]
    globals()[f"case_{case}"](Path(out), shards, rec)
