"""The per-worker training loop, run by every Ray Train worker. Read it top to bottom.

1. process group + DeepSpeed accelerator      5. resume: checkpoint, data position, step
2. the run's plan, the item table (no copy)   6. the loop: curriculum -> prompts -> batch -> step
3. tokenizer + model (base + LoRA + projector) 7. reports, metrics, checkpoints (all ranks alike)
4. DeepSpeed engine from the filled config     8. export the gathered adapter + projector

Invariants that keep ZeRO-3 collectives from hanging: every rank runs the same number of optimiser
steps (the stream gives every rank the same number of batches) and calls ``ray.train.report`` at
the same steps. Everything random is a function of (seed, global step[, rank]) and the run's plan
(`run_state.py`) is kept on resume, so a restart at any world size continues the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class _Worker:
    """What every step of the loop needs to know about this worker and its run."""

    cfg: Any  # Config, with train.grad_accum set for this world size (the plan's effective batch)
    plan: Any  # RunPlan: fixed when the run started, checked on every resume
    rank: int
    world: int
    use_gpu: bool
    run_dir: Path
    item_table: Any  # torch.Tensor view of the object store's read-only array
    meta: dict
    titles: list
    domain: str
    hidden_size: int  # the base model's width (DeepSpeed bucket sizes)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The eight steps of the module docstring, one call each."""
    rank, world = _start_process_group(loop_config["use_gpu"])                     # 1
    import ray.train

    from llara_dist.train.checkpoint import pick_checkpoint

    # Checkpoint first: the run's plan and the world size it was written at configure DeepSpeed.
    resume = pick_checkpoint(ray.train.get_checkpoint(), world_size=world, rank=rank)
    w = _worker(loop_config, rank, world, resume)                                   # 2 + the run's plan
    engine, model, tokenizer, freeze = _build_engine(w, resume)                     # 3-4
    stream, start_step, samples_seen = _resume(w, engine, resume)                   # 5
    end_step = _train(w, engine, freeze, tokenizer, stream, start_step, samples_seen,  # 6-7
                      best=resume.state.best_valid if resume else None)
    if end_step == w.plan.total_steps:                                             # 8
        _export(w, model, tokenizer, start_step)


def _start_process_group(use_gpu: bool) -> tuple[int, int]:
    """1. Ray Train created the process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it."""
    # DeepSpeed picks its accelerator at first use; on a CPU-only worker that must be "cpu" (gloo).
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # gloo's collectives warn on every call that their names are deprecated; keep the logs readable.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*")

    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    if use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    return ctx.get_world_rank(), ctx.get_world_size()


def _worker(loop_config: dict[str, Any], rank: int, world: int, resume) -> _Worker:
    """2. The item table from the object store (no copy), the data's metadata, and the run's plan."""
    import ray

    from llara_dist.config import Config
    from llara_dist.data.shards import load_meta, load_titles
    from llara_dist.model.llara import as_item_table
    from llara_dist.train.run_state import RunPlan, reconcile

    cfg = Config.model_validate(loop_config["config"])
    given = loop_config["plan"]
    # The driver checked the plan against the storage it can read; the checkpoint actually resumed
    # (remote storage, or an older one after a fallback) is checked here, on every rank alike.
    saved = RunPlan.from_dict(resume.state.plan) if resume is not None and resume.state.plan else None
    plan = reconcile(saved, RunPlan.from_dict(given["run"]), replan=given["replan"],
                     source=str(resume.path) if resume is not None else "")
    # A world size other than the plan's keeps the effective batch through the accumulation.
    accum = plan.accumulation(cfg.train.micro_batch_size, world)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": accum})})
    # ray.get maps the shared-memory buffer read-only; the tensor shares it (the table is frozen).
    item_table = as_item_table(ray.get(loop_config["item_table"]))
    meta = load_meta(cfg.data.shards)
    return _Worker(cfg=cfg, plan=plan, rank=rank, world=world, use_gpu=loop_config["use_gpu"],
                   run_dir=Path(given["run_dir"]), item_table=item_table, meta=meta,
                   titles=load_titles(cfg.data.shards), domain=cfg.data.domain or meta["domain"],
                   hidden_size=given["hidden_size"])


def _build_engine(w: _Worker, resume):
    """3-4. Tokenizer, model (base + LoRA + projector) and the DeepSpeed engine from the filled config."""
    from llara_dist.model.llara import build_model, load_tokenizer
    from llara_dist.train.ds_config import build_ds_config

    ds_config = build_ds_config(w.cfg, world_size=w.world, total_steps=w.plan.total_steps,
                                hidden_size=w.hidden_size,
                                load_universal=bool(resume and resume.universal))
    tokenizer = load_tokenizer(w.cfg.model, w.titles)
    # With model.zero_init, a local checkpoint loads straight into ZeRO-3 partitions.
    model = build_model(w.cfg, tokenizer, rec_dim=int(w.item_table.shape[1]), ds_config=ds_config)
    engine, freeze = initialize_engine(model, ds_config)
    return engine, model, tokenizer, freeze


def initialize_engine(model, ds_config: dict):
    """The DeepSpeed engine over the trainable parameters, in two optimiser groups (LoRA, projector),
    and the :class:`ProjectorFreeze` that keeps the projector still on text steps."""
    import deepspeed

    groups = [{"name": "lora", "params": [p for n, p in model.named_parameters()
                                          if p.requires_grad and not n.startswith("projector.")]},
              {"name": PROJECTOR_GROUP, "params": [p for p in model.projector.parameters() if p.requires_grad]}]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, ProjectorFreeze(engine)


PROJECTOR_GROUP = "projector"


class ProjectorFreeze:
    """On a text step the projector must not move: not its weights, not Adam's moments, not its step count.

    A text step gives the projector an exactly zero gradient (see :func:`_micro_batches`), but Adam
    would still update it from its momentum, decay its moments and count the step (torch's AdamW
    only skips a parameter whose ``grad`` is None, which the original LLaRA relied on; ZeRO's flat
    gradient buffers are never None). So while ``active``, the projector's parameter group is
    emptied just for the duration of the underlying torch optimiser's ``step`` (a step pre-hook
    empties it, the post-hook puts it back). This works under ZeRO-2 (one ``step`` over every
    group) and ZeRO-3 (one ``step`` per sub-group, with the other groups already empty). The
    optimizer state itself is untouched, so checkpoints and exact resume are unaffected.
    """

    def __init__(self, engine):
        self.active = False
        self._stashed: dict[tuple[int, int], list] = {}
        zero = engine.optimizer
        optimizers = [engine.basic_optimizer]
        if getattr(zero, "backup_optimizer", None) is not None:  # ZeRO-3 partial offload
            optimizers.append(zero.backup_optimizer)
        for opt in optimizers:
            if not any(g.get("name") == PROJECTOR_GROUP for g in opt.param_groups):
                raise RuntimeError(f"{type(opt).__name__}: no '{PROJECTOR_GROUP}' parameter group")
            opt.register_step_pre_hook(self._before)
            opt.register_step_post_hook(self._after)

    def _before(self, opt, args, kwargs) -> None:
        if not self.active:
            return
        for i, group in enumerate(opt.param_groups):
            if group.get("name") == PROJECTOR_GROUP:
                self._stashed[(id(opt), i)] = group["params"]
                group["params"] = []

    def _after(self, opt, args, kwargs) -> None:
        for (key, i) in [k for k in self._stashed if k[0] == id(opt)]:
            opt.param_groups[i]["params"] = self._stashed.pop((key, i))


def _resume(w: _Worker, engine, resume):
    """5. The DeepSpeed state, the data position and the step of the checkpoint resumed (if any)."""
    from llara_dist.data.stream import TrainStream

    cfg = w.cfg
    stream = TrainStream(cfg.data.shards, batch_size=cfg.train.micro_batch_size, rank=w.rank, world_size=w.world,
                         seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         num_candidates=w.meta["num_candidates"], skip_corrupt=cfg.data.skip_corrupt,
                         canonical=cfg.data.canonical_ranges)
    if resume is None:
        return stream, 0, 0
    engine.load_checkpoint(str(resume.path), tag=resume.tag, load_module_strict=False)
    stream.load_state_dict(resume.state.stream)
    _check_engine_step(engine, resume.state.step, resume)
    return stream, resume.state.step, resume.state.samples_seen


def _train(w: _Worker, engine, freeze: "ProjectorFreeze", tokenizer, stream, start_step: int,
           samples_seen: int, best: dict | None) -> int:
    """6-7. The loop, and at the report steps: metrics, validation, checkpoints (all ranks alike).

    ``step`` counts completed optimiser steps; step s draws its curriculum decision, its dropout
    RNG and its data from (seed, s) and the stream position alone. Returns the step it ended at.
    """
    import torch
    from tqdm import tqdm

    from llara_dist.data.collate import TrainCollator
    from llara_dist.train.curriculum import Curriculum
    from llara_dist.train.metrics import MetricsLog

    cfg, plan = w.cfg, w.plan
    curriculum = Curriculum.parse(plan.curriculum, plan.total_steps, plan.seed)
    collator = TrainCollator(tokenizer, cfg.data.max_length)
    validation = _Validation(cfg, w.domain, w.titles, w.item_table, tokenizer, w.rank, w.world, best=best)
    metrics = MetricsLog(w.run_dir, enabled=w.rank == 0, resume_step=start_step)
    report = _Reporter(w, engine, stream, validation, metrics)
    # train.stop_after_steps ends this invocation early (checkpointed) without touching the schedule.
    end_step = min(plan.total_steps, cfg.train.stop_after_steps or plan.total_steps)
    batches = iter(stream)
    bar = tqdm(total=plan.total_steps, initial=start_step, desc="train", disable=w.rank != 0, mininterval=5,
               dynamic_ncols=True)
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        hybrid = curriculum.is_hybrid(step)
        torch.manual_seed(_seed_for(plan.seed, step, w.rank))
        micro = _micro_batches(w, batches, collator, hybrid)
        freeze.active = not hybrid
        loss, tokens = train_step(engine, micro, item_table=w.item_table, world=w.world)
        samples_seen += plan.global_batch
        done = step + 1
        report.window.add(loss, tokens, hybrid, time.perf_counter() - t0)
        bar.update(1)
        if report.due(done, end_step):
            row = report.emit(done, end_step, samples_seen)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
    bar.close()
    metrics.close()
    return end_step


def _micro_batches(w: _Worker, batches, collator, hybrid: bool) -> list[dict]:
    """This rank's micro-batches of one optimiser step: prompts (hybrid or text) -> tokens -> batch."""
    import torch

    from llara_dist.data.prompts import build_prompt

    out = []
    for _ in range(w.cfg.train.grad_accum):
        samples = next(batches)
        prompts = [build_prompt(s, w.titles, mode="hybrid" if hybrid else "text", domain=w.domain,
                                seed=w.cfg.train.seed) for s in samples]
        batch = collator(prompts)
        if batch["batch_items"].numel() == 0:
            # Text batch: project the padding row anyway and inject it nowhere (all slots -1), so
            # the projector is in every step's graph with an exactly zero gradient. Left out of
            # the graph, DeepSpeed carries its last hybrid gradient state over text steps, state
            # no checkpoint holds: a resumed run then drifts from an uninterrupted one. (Adam
            # itself is kept off the projector by ProjectorFreeze.)
            batch["batch_items"] = torch.tensor([w.meta["n_items"]], dtype=torch.long)
        out.append(batch)
    return out


def answer_tokens(batch: dict) -> int:
    """Tokens the loss counts in ``batch``: labels other than -100, after the causal shift by one."""
    return int((batch["labels"][:, 1:] != -100).sum())


def train_step(engine, micro_batches: list[dict], *, item_table, world: int) -> tuple[float, int]:
    """One optimiser step over this rank's micro-batches.

    The loss is the sum of the answer tokens' losses over the whole global batch (every
    micro-batch of every rank) divided by their global count, so it does not depend on how the
    batch is split into micro-batches, accumulation steps and ranks. Returns this rank's part of
    that loss (the parts sum to it over ranks) and the number of tokens it processed.
    """
    import torch
    import torch.distributed as dist

    count = torch.tensor([sum(answer_tokens(b) for b in micro_batches)], dtype=torch.float64)
    if world > 1:
        count = count.to(engine.device) if str(engine.device).startswith("cuda") else count
        dist.all_reduce(count)
    n_global = max(1, int(count.item()))
    # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages the
    # gradients over ranks; scaling by both back makes the gradient d(sum of losses)/n_global.
    scale = world * len(micro_batches)
    loss_part, tokens = 0.0, 0
    for batch in micro_batches:
        out = engine(input_ids=batch["input_ids"].to(engine.device),
                     attention_mask=batch["attention_mask"].to(engine.device),
                     slots=batch["slots"].to(engine.device), batch_items=batch["batch_items"],
                     item_table=item_table, labels=batch["labels"].to(engine.device),
                     num_items_in_batch=n_global)
        engine.backward(out.loss * scale)
        engine.step()
        loss_part += float(out.loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return loss_part, tokens


class _Reporter:
    """7. A report: a metrics row, maybe validation, maybe a checkpoint. Every rank reaches it at the
    same steps (it is a barrier) and calls ``ray.train.report`` the same number of times."""

    def __init__(self, w: _Worker, engine, stream, validation: "_Validation", metrics):
        self.w, self.engine, self.stream, self.validation, self.metrics = w, engine, stream, validation, metrics
        self.window = _Window()
        self.zero_stage = int(engine.zero_optimization_stage())
        # Parameter values this rank holds vs the whole model: ~1/world under ZeRO-3.
        self.params_local = sum(_held(p) for p in engine.module.parameters())
        self.params_total = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())

    def due(self, done: int, end_step: int) -> bool:
        cfg = self.w.cfg.train
        return (done % cfg.log_every == 0 or self._ckpt_due(done, end_step)
                or self.validation.due(done, end_step))

    def _ckpt_due(self, done: int, end_step: int) -> bool:
        return done % self.w.cfg.train.checkpoint_every == 0 or done == end_step

    def emit(self, done: int, end_step: int, samples_seen: int) -> dict:
        import ray.train

        from llara_dist.train.ranks import on_rank0

        w = self.w
        row = self.window.reduce(w.world, self.engine.device, w.plan.global_batch)
        row.update(step=done, lr=float(self.engine.get_lr()[0]), epoch=self.stream.state_dict()["epoch"],
                   samples=samples_seen, memory_gb=_memory_gb(w.use_gpu), world_size=w.world,
                   grad_accum=w.cfg.train.grad_accum, params_local=self.params_local,
                   params_total=self.params_total, time=time.time())
        if self.validation.due(done, end_step):  # collective: every rank generates its part of the subset
            row.update(self.validation.run(self.engine.module, done, w.run_dir / "best"))
        on_rank0(lambda: self.metrics.log(row), rank=w.rank)  # a full disk ends every rank, not just 0
        self.window = _Window()
        if not self._ckpt_due(done, end_step):
            ray.train.report(row)
            return row
        self._checkpoint(row, done, samples_seen)
        return row

    def _checkpoint(self, row: dict, done: int, samples_seen: int) -> None:
        import ray.train

        from llara_dist.train.checkpoint import TrainerState, checkpoint_dir_name, ds_tag, save_rank_checkpoint

        w = self.w
        state = TrainerState(step=done, world_size=w.world, tag=ds_tag(done), stream=self.stream.state_dict(),
                             zero_stage=self.zero_stage, plan=w.plan.to_dict(), samples_seen=samples_seen,
                             best_valid=self.validation.best)
        with tempfile.TemporaryDirectory(prefix=f"llara-ckpt-r{w.rank}-") as tmp:
            save_rank_checkpoint(self.engine, Path(tmp), state, w.rank)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(done))


def _export(w: _Worker, model, tokenizer, start_step: int) -> None:
    """8. Export gathered from the ZeRO partitions (collective), written by rank 0."""
    from llara_dist.model.llara import write_export

    cfg, run_dir = w.cfg, w.run_dir
    write_export(model, tokenizer, run_dir / "final",
                 extra_config={"step": max(start_step, w.plan.total_steps), "run_dir": str(run_dir),
                               # already absolute (or URIs) from the driver's `paths.resolve_paths`
                               "shards": cfg.data.shards, "rec_dir": cfg.train.rec_dir,
                               "shards_fingerprint": w.plan.shards_fingerprint, "curriculum": w.plan.curriculum})


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
        from llara_dist.model.llara import write_export

        res = validate_in_training(model, self.tokenizer, self.subset, self.titles, self.item_table, self.settings,
                                   rank=self.rank, world_size=self.world)
        if self.best is None or res["hit_ratio@1"] > self.best["hit_ratio@1"]:
            self.best = {"step": done, "hit_ratio@1": res["hit_ratio@1"], "valid_ratio": res["valid_ratio"],
                         "n": res["n"]}
            write_export(model, self.tokenizer, best_dir,
                         extra_config={"step": done, "valid": self.best,
                                       "shards": self.cfg.data.shards, "rec_dir": self.cfg.train.rec_dir})
        return {"valid/hit_ratio@1": res["hit_ratio@1"], "valid/valid_ratio": res["valid_ratio"],
                "valid/best_step": self.best["step"]}


class _Window:
    """Sums over the steps since the last report, summed across ranks at report time."""

    def __init__(self) -> None:
        self.loss = 0.0  # this rank's parts of each step's global-batch loss
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

    def reduce(self, world: int, device, samples_per_step: int) -> dict:
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.loss, float(self.tokens), self.seconds], dtype=torch.float64)
        if world > 1:
            t = t.to(device) if str(device).startswith("cuda") else t
            dist.all_reduce(t)
            t = t.cpu()
        loss, tokens, seconds = t.tolist()
        steps = max(1, self.steps)
        step_time = seconds / world / steps  # mean over ranks
        # The ranks' parts add up to each step's loss over the global batch.
        return {"loss": loss / steps, "hybrid_share": self.hybrid / steps, "step_time_s": step_time,
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
