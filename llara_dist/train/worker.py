"""The per-worker training loop, run by every Ray Train worker. Read it top to bottom.

1. process group + DeepSpeed accelerator      5. resume: checkpoint, data position, step
2. item table from the object store (no copy) 6. the loop: curriculum -> prompts -> batch -> step
3. tokenizer + model (base + LoRA + projector) 7. reports, metrics, checkpoints (all ranks alike)
4. DeepSpeed engine from the filled config     8. export the gathered adapter + projector

Invariants that keep ZeRO-3 collectives from hanging: every rank runs the same number of optimiser
steps (the stream gives every rank the same number of batches) and calls ``ray.train.report`` at
the same steps. Everything random is a function of (seed, global step[, rank]), so a restart at
any world size continues the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # DeepSpeed picks its accelerator at first use; on a CPU-only worker that must be "cpu" (gloo).
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import warnings

    # gloo's collectives warn on every call that their names are deprecated; keep the logs readable.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*")

    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from llara_dist.config import Config
    from llara_dist.data.collate import TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.data.shards import load_meta, load_titles
    from llara_dist.data.stream import TrainStream
    from llara_dist.model.llara import build_model, load_tokenizer
    from llara_dist.train.checkpoint import (TrainerState, checkpoint_dir_name, ds_tag, export_final,
                                             pick_checkpoint, save_rank_checkpoint)
    from llara_dist.train.curriculum import Curriculum
    from llara_dist.train.ds_config import build_ds_config, zero_stage
    from llara_dist.train.metrics import MetricsLog

    cfg = Config.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    run_dir = Path(plan["run_dir"])
    total_steps: int = plan["total_steps"]

    # 1. Process group: Ray Train created it (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if loop_config["use_gpu"]:
        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend="nccl" if loop_config["use_gpu"] else "gloo")

    # 2. The frozen item table: put into the object store once by the driver; ray.get maps the
    # shared-memory buffer read-only, and torch.from_numpy shares it (no per-worker copy).
    table_np = ray.get(loop_config["item_table"])
    with _quiet_readonly_warning():
        item_table = torch.from_numpy(table_np)

    meta = load_meta(cfg.data.shards)
    titles = load_titles(cfg.data.shards)
    domain = cfg.data.domain or meta["domain"]

    # 3-5. Checkpoint first: resuming on another world size changes how DeepSpeed is configured.
    resume = pick_checkpoint(ray.train.get_checkpoint(), world_size=world, rank=rank)
    ds_config = build_ds_config(cfg, world_size=world, total_steps=total_steps, hidden_size=plan["hidden_size"],
                                load_universal=bool(resume and resume.universal))
    tokenizer = load_tokenizer(cfg.model, titles)
    # With model.zero_init, a local checkpoint loads straight into ZeRO-3 partitions.
    model = build_model(cfg, tokenizer, rec_dim=int(item_table.shape[1]), ds_config=ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    stage = zero_stage(ds_config)
    # Parameter values this rank holds vs the whole model: ~1/world under ZeRO-3.
    params_local = sum(_held(p) for p in engine.module.parameters())
    params_total = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())

    stream = TrainStream(cfg.data.shards, batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                         seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         num_candidates=meta["num_candidates"], skip_corrupt=cfg.data.skip_corrupt,
                         canonical=cfg.data.canonical_ranges)
    start_step, samples_seen = 0, 0
    if resume is not None:
        engine.load_checkpoint(str(resume.path), tag=resume.tag, load_module_strict=False)
        start_step, samples_seen = resume.state.step, resume.state.samples_seen
        stream.load_state_dict(resume.state.stream)
        _check_engine_step(engine, start_step, resume)

    curriculum = Curriculum.parse(cfg.train.curriculum, total_steps, cfg.train.seed)
    validation = _Validation(cfg, domain, titles, item_table, tokenizer, rank, world,
                             best=resume.state.extra.get("best_valid") if resume else None)
    collator = TrainCollator(tokenizer, cfg.data.max_length)
    metrics = MetricsLog(run_dir, enabled=rank == 0, resume_step=start_step)
    fingerprint = meta.get("fingerprint")

    # 6. The loop. `step` counts completed optimiser steps; step s draws its curriculum decision,
    # its dropout RNG and its data from (seed, s) and the stream position alone.
    batches = iter(stream)
    window = _Window()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=rank != 0, mininterval=5,
               dynamic_ncols=True)
    # train.stop_after_steps ends this invocation early (checkpointed) without touching the schedule.
    end_step = min(total_steps, cfg.train.stop_after_steps or total_steps)
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        hybrid = curriculum.is_hybrid(step)
        torch.manual_seed(_seed_for(cfg.train.seed, step, rank))
        step_loss, step_tokens = 0.0, 0
        for _ in range(cfg.train.grad_accum):
            samples = next(batches)
            prompts = [build_prompt(s, titles, mode="hybrid" if hybrid else "text", domain=domain,
                                    seed=cfg.train.seed) for s in samples]
            batch = collator(prompts)
            items = batch["batch_items"]
            if items.numel() == 0:
                # Text batch: project the padding row anyway and inject it nowhere (all slots -1), so
                # the projector is in every step's graph with an exactly zero gradient. Left out of
                # the graph, DeepSpeed carries its last hybrid gradient state over text steps, state
                # no checkpoint holds: a resumed run then drifts from an uninterrupted one.
                items = torch.tensor([meta["n_items"]], dtype=torch.long)
            out = engine(input_ids=batch["input_ids"].to(engine.device),
                         attention_mask=batch["attention_mask"].to(engine.device),
                         slots=batch["slots"].to(engine.device), batch_items=items,
                         item_table=item_table, labels=batch["labels"].to(engine.device))
            loss = out.loss if hasattr(out, "loss") else out
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / cfg.train.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
        samples_seen += cfg.train.micro_batch_size * cfg.train.grad_accum * world
        done = step + 1
        window.add(step_loss, step_tokens, hybrid, time.perf_counter() - t0)
        bar.update(1)

        log_now = done % cfg.train.log_every == 0
        ckpt_now = done % cfg.train.checkpoint_every == 0 or done == end_step
        valid_now = validation.due(done, end_step)
        if not (log_now or ckpt_now or valid_now):
            continue
        # 7. A report: every rank reaches this at the same steps (it is a barrier).
        row = window.reduce(dist, world, engine.device, cfg.train.micro_batch_size * cfg.train.grad_accum * world)
        row.update(step=done, lr=float(engine.get_lr()[0]), hybrid_prob=curriculum.hybrid_probability(step),
                   hybrid=int(hybrid), epoch=stream.state_dict()["epoch"], samples=samples_seen,
                   memory_gb=_memory_gb(loop_config["use_gpu"]), world_size=world,
                   params_local=params_local, params_total=params_total, time=time.time())
        if valid_now:  # collective: every rank generates its part of the fixed subset
            row.update(validation.run(engine.module, done, run_dir / "best"))
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        metrics.log(row)
        window = _Window()
        if not ckpt_now:
            ray.train.report(row)
            continue
        state = TrainerState(step=done, total_steps=total_steps, world_size=world, tag=ds_tag(done),
                             stream=stream.state_dict(), zero_stage=stage, samples_seen=samples_seen,
                             extra={"shards_fingerprint": fingerprint, "curriculum": cfg.train.curriculum,
                                    "seed": cfg.train.seed, "best_valid": validation.best})
        with tempfile.TemporaryDirectory(prefix=f"llara-ckpt-r{rank}-") as tmp:
            save_rank_checkpoint(engine, Path(tmp), state, rank)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(done))
    bar.close()
    metrics.close()

    # 8. Export gathered from the ZeRO partitions (collective), written by rank 0.
    if end_step < total_steps:
        return
    export_final(model, tokenizer, run_dir / "final", rank=rank,
                 extra={"step": max(start_step, total_steps), "run_dir": str(run_dir),
                        "shards": str(Path(cfg.data.shards).resolve()), "rec_dir": str(Path(cfg.train.rec_dir).resolve()),
                        "shards_fingerprint": fingerprint, "curriculum": cfg.train.curriculum})


class _Validation:
    """Periodic validation on a fixed valid subset (every ``train.valid_every`` steps and at the end),
    and the export of the best model by valid HitRatio@1 to ``RUN/best``."""

    def __init__(self, cfg, domain: str, titles, item_table, tokenizer, rank: int, world: int, best: dict | None):
        self.every = cfg.train.valid_every
        self.best = best
        self.rank, self.world = rank, world
        self.titles, self.item_table, self.tokenizer = titles, item_table, tokenizer
        self.cfg = cfg
        if not self.every:
            return
        from llara_dist.eval.evaluate import EvalSettings
        from llara_dist.eval.validation import validation_subset

        self.subset = validation_subset(cfg.data.shards, cfg.train.valid_samples)
        self.settings = EvalSettings(prompt="hybrid", decoding="free", batch_size=cfg.eval.batch_size,
                                     max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
                                     domain=domain, seed=cfg.train.seed)

    def due(self, done: int, end_step: int) -> bool:
        return bool(self.every) and (done % self.every == 0 or done == end_step)

    def run(self, model, done: int, best_dir: Path) -> dict:
        from llara_dist.eval.validation import validate_in_training
        from llara_dist.train.checkpoint import export_final

        res = validate_in_training(model, self.tokenizer, self.subset, self.titles, self.item_table, self.settings,
                                   rank=self.rank, world_size=self.world)
        if self.best is None or res["hit_ratio@1"] > self.best["hit_ratio@1"]:
            self.best = {"step": done, "hit_ratio@1": res["hit_ratio@1"], "valid_ratio": res["valid_ratio"],
                         "n": res["n"]}
            export_final(model, self.tokenizer, best_dir, rank=self.rank,
                         extra={"step": done, "valid": self.best, "shards": str(Path(self.cfg.data.shards).resolve()),
                                "rec_dir": str(Path(self.cfg.train.rec_dir).resolve())})
        return {"valid/hit_ratio@1": res["hit_ratio@1"], "valid/valid_ratio": res["valid_ratio"],
                "valid/best_step": self.best["step"]}


class _Window:
    """Sums over the steps since the last report, averaged across ranks at report time."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.tokens = 0
        self.hybrid = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss: float, tokens: int, hybrid: bool, seconds: float) -> None:
        self.loss += loss
        self.tokens += tokens
        self.hybrid += int(hybrid)
        self.steps += 1
        self.seconds += seconds

    def reduce(self, dist, world: int, device, samples_per_step: int) -> dict:
        import torch

        t = torch.tensor([self.loss, float(self.tokens), self.seconds], dtype=torch.float64)
        if world > 1:
            t = t.to(device) if str(device).startswith("cuda") else t
            dist.all_reduce(t)
            t = t.cpu()
        loss, tokens, seconds = t.tolist()
        steps = max(1, self.steps)
        step_time = seconds / world / steps  # mean over ranks
        return {"loss": loss / world / steps, "hybrid_share": self.hybrid / steps, "step_time_s": step_time,
                "tokens_per_s": tokens / (step_time * steps) if step_time > 0 else 0.0,
                "samples_per_s": samples_per_step / step_time if step_time > 0 else 0.0}


def _held(p) -> int:
    """Values of parameter ``p`` this rank holds: its ZeRO-3 partition, or all of it if not partitioned
    (or kept whole by stage3_param_persistence_threshold)."""
    if p.numel() == 0 and hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.numel()


def _memory_gb(use_gpu: bool) -> float:
    import torch

    if use_gpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _check_engine_step(engine, step: int, resume) -> None:
    """DeepSpeed's own step counter must agree with the trainer state it was saved with."""
    from llara_dist.errors import CheckpointError

    if engine.global_steps != step:
        raise CheckpointError(f"{resume.path}: DeepSpeed restored step {engine.global_steps} but "
                              f"{resume.path.name}/trainer_state.json says {step}")


class _quiet_readonly_warning:
    """torch warns that the object-store array is read-only; it is meant to be (the table is frozen)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", message=".*not writable.*")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
