"""The run's plan: what a run means, fixed when it starts, saved with every checkpoint, checked on resume.

torchtune's recipes save a small "recipe state" (seed, epochs, max steps) with each checkpoint
and compare it with the config on resume. Here the plan is everything that decides *which*
optimiser steps a run takes and on what: the schedule length, the effective batch (samples per
optimiser step over all workers), the seed, the curriculum, the data, the optimiser's settings.
Recomputing it from the config at every start would silently change the run after a restart
(resuming an 8-worker epoch-based run on 4 workers would double ``total_steps``, re-stretch the
cosine schedule and slow the curriculum down). So:

* a fresh run fixes its plan from the config (:func:`make_plan`);
* a resumed run keeps the saved plan (:func:`reconcile`). A different world size is not a change
  of plan: the effective batch is kept by adjusting gradient accumulation
  (:meth:`RunPlan.accumulation`), or the world size is refused with one line saying why;
  any other difference is refused naming the config key, unless ``--replan`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from llara_dist.config import Config, worker_range
from llara_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Plan fields a resumed run must agree on, with the config key that sets each one.
MEANING = {
    "seed": "train.seed",
    "curriculum": "train.curriculum",
    "shards_fingerprint": "data.shards",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "lr": "train.lr",
    "min_lr_ratio": "train.min_lr_ratio",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "grad_clip": "train.grad_clip",
    "max_length": "data.max_length",
}
BATCH_KEY = "train.micro_batch_size x train.grad_accum x scaling.num_workers"


@dataclass(frozen=True)
class RunPlan:
    total_steps: int
    steps_per_epoch: int
    global_batch: int  # samples per optimiser step over all workers (the effective batch)
    # How the effective batch was first made (reference for telling a world-size change apart).
    micro_batch_size: int
    grad_accum: int
    workers: int
    n_train: int
    epochs: int
    max_steps: int | None
    seed: int
    curriculum: str
    shards_fingerprint: str | None
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    max_length: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, tree: dict) -> "RunPlan":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in tree.items() if k in names})

    def accumulation(self, micro_batch_size: int, world_size: int) -> int:
        """Gradient accumulation steps that keep the effective batch at ``world_size`` workers."""
        per_pass = micro_batch_size * world_size
        if self.global_batch % per_pass:
            raise ConfigError(
                f"scaling.num_workers: {world_size} workers x train.micro_batch_size {micro_batch_size} cannot make "
                f"this run's effective batch of {self.global_batch} samples per step ({self.global_batch} is not a "
                f"multiple of {per_pass}); use a worker count and micro batch size whose product divides it")
        return self.global_batch // per_pass


def make_plan(cfg: Config, n_train: int, fingerprint: str | None) -> RunPlan:
    """The plan a fresh run would fix from ``cfg``; refuses a worker range that cannot keep the batch."""
    t = cfg.train
    lo, hi = worker_range(cfg)
    # Epochs are counted at the largest world size: the run's intended effective batch.
    global_batch = t.micro_batch_size * t.grad_accum * hi
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch < 1:
        raise DataError(f"{cfg.data.shards}: {n_train} train samples are fewer than one optimiser step needs "
                        f"({hi} workers x train.micro_batch_size {t.micro_batch_size} x "
                        f"train.grad_accum {t.grad_accum} = {global_batch})")
    plan = RunPlan(total_steps=t.max_steps or t.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                   global_batch=global_batch, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                   workers=hi, n_train=n_train, epochs=t.epochs, max_steps=t.max_steps, seed=t.seed,
                   curriculum=t.curriculum, shards_fingerprint=fingerprint, lr=t.lr, min_lr_ratio=t.min_lr_ratio,
                   warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                   max_length=cfg.data.max_length)
    for world in range(lo, hi + 1):  # an elastic run may resize to any of these
        plan.accumulation(t.micro_batch_size, world)
    return plan


def reconcile(saved: RunPlan | None, fresh: RunPlan, *, replan: bool, source: str) -> RunPlan:
    """The plan a (re)started run follows: ``saved`` if there is one, else ``fresh``.

    ``source`` names the checkpoint the saved plan came from (for the error message). With
    ``replan`` the fresh plan replaces the saved one (the step and data position are kept).
    """
    if saved is None:
        return fresh
    changed = [k for k in MEANING if getattr(saved, k) != getattr(fresh, k)]
    batch_changed = (fresh.global_batch != saved.global_batch
                     and (fresh.micro_batch_size, fresh.grad_accum) != (saved.micro_batch_size, saved.grad_accum))
    if replan:
        if changed or batch_changed or fresh.total_steps != saved.total_steps:
            log.warning("--replan: %s: the run continues with a new plan (%d steps, effective batch %d)",
                        source, fresh.total_steps, fresh.global_batch)
        return fresh
    problems = [f"{MEANING[k]} is {_show(k, getattr(fresh, k))} but the run was planned with {_show(k, getattr(saved, k))}"
                for k in changed]
    if batch_changed:
        problems.append(f"the effective batch ({BATCH_KEY}) is {fresh.micro_batch_size} x {fresh.grad_accum} x "
                        f"{fresh.workers} = {fresh.global_batch} but the run was planned with {saved.global_batch}")
    if problems:
        raise ConfigError(f"{source}: resuming would change the run: {'; '.join(problems)} "
                          "(restore the setting, use a new --run-dir, or pass --replan)")
    # Only the world size differs (or nothing): the saved plan holds, total_steps included.
    return saved


def _show(key: str, value) -> str:
    if key == "shards_fingerprint" and isinstance(value, str):
        return f"shards with fingerprint {value[:12]}..."
    return repr(value)
