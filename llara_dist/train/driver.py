"""`llara-dist train`: check the inputs, connect to Ray, put the item table in the object store once,
and run the per-worker loop (`worker.py`) under a Ray Train ``TorchTrainer``.

The driver only assembles; all per-worker work is in the train function. Everything that can be
checked before workers start is checked here, so bad input fails in seconds with one message
instead of minutes later inside a worker.

Run directory::

    RUN/config.yaml          the fully resolved config (`--config RUN/config.yaml` resumes the run)
    RUN/metrics.jsonl        one JSON object per report (step, loss, lr, hybrid share, ...)
    RUN/tb/                  TensorBoard
    RUN/checkpoints/         Ray Train's run directory: step_NNNNNNNN/ DeepSpeed checkpoints
    RUN/final/               adapter/ (PEFT), projector.safetensors, llara_config.json, tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llara_dist.config import Config, save_config, worker_range
from llara_dist.errors import CheckpointError, ConfigError, LlaraError
from llara_dist.train.run_state import RunPlan


@dataclass
class TrainPlan:
    run_dir: Path
    run: RunPlan  # what the run means: fixed at its start, kept on resume (run_state.py)
    hidden_size: int
    storage_path: str
    name: str
    n_train: int = 0
    checks: dict | None = None  # what `dry_run.cheap_checks` found (prompts checked, parameter counts)

    @property
    def total_steps(self) -> int:
        return self.run.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.run.steps_per_epoch


def _hidden_size(cfg: Config) -> int:
    if cfg.model.name_or_path == "tiny":
        return cfg.model.tiny.hidden_size
    from llara_dist.model.llara import _model_dir

    config_json = _model_dir(cfg.model) / "config.json"
    tree = json.loads(config_json.read_text())
    hidden = tree.get("hidden_size") or tree.get("n_embd") or tree.get("d_model")
    if not hidden:
        raise ConfigError(f"{config_json}: no hidden_size")
    return int(hidden)


def plan_run(cfg: Config, n_train: int, *, replan: bool = False) -> TrainPlan:
    """The run's plan: fresh from ``cfg``, or the one saved with the run's latest checkpoint (which a
    resume keeps; a change is refused naming the key unless ``replan``); raises on anything inconsistent."""
    from llara_dist.data.shards import load_meta
    from llara_dist.train.run_state import make_plan, reconcile

    run_dir = Path(cfg.run_dir).resolve()
    if cfg.ray.storage_path:
        storage, name = cfg.ray.storage_path, cfg.ray.name or run_dir.name
    else:
        storage, name = str(run_dir), cfg.ray.name or "checkpoints"
    fresh = make_plan(cfg, n_train, load_meta(cfg.data.shards).get("fingerprint"))
    saved, source = _saved_plan(storage, name)
    return TrainPlan(run_dir, reconcile(saved, fresh, replan=replan, source=source), _hidden_size(cfg), storage, name,
                     n_train)


def _saved_plan(storage: str, name: str) -> tuple[RunPlan | None, str]:
    """The plan in the newest checkpoint's trainer state, when the driver can read the storage.

    Remote storage the driver cannot open is left to the workers, which check the checkpoint
    they actually resume against the same rules.
    """
    import pyarrow.fs

    from llara_dist.train.checkpoint import STATE_FILE, TrainerState, step_dirs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (None, storage)
        for path in step_dirs(f"{root.rstrip('/')}/{name}", fs):
            fs_ = fs or pyarrow.fs.LocalFileSystem()
            info = fs_.get_file_info(f"{path}/{STATE_FILE}")
            if info.type != pyarrow.fs.FileType.File:
                continue  # a checkpoint rank 0 never finished: the workers fall back past it
            with fs_.open_input_stream(info.path) as f:
                state = TrainerState.from_json(f.read().decode(), info.path)
            return (RunPlan.from_dict(state.plan) if state.plan else None), path
    except (OSError, ValueError, pyarrow.ArrowException):  # e.g. no credentials on the driver
        pass
    return None, ""


def preflight(cfg: Config, *, replan: bool = False) -> tuple[TrainPlan, "object", dict]:
    """Every check that needs no worker: shards, item table vs shards, model path, DS config, resume."""
    from llara_dist.data.shards import check_shards, load_meta
    from llara_dist.recommender.table import load_item_table
    from llara_dist.train.ds_config import build_ds_config

    meta = load_meta(cfg.data.shards)
    # Damaged train shards are named now (or skipped, with data.skip_corrupt), not inside a worker.
    usable, _ = check_shards(cfg.data.shards, "train", skip_corrupt=cfg.data.skip_corrupt)
    table, rec_meta = load_item_table(cfg.train.rec_dir, meta)
    plan = plan_run(cfg, sum(int(e["samples"]) for e in usable), replan=replan)
    lo, hi = worker_range(cfg)
    for world in sorted({lo, hi}):  # batch size depends on the world size: check both ends
        build_ds_config(cfg, world_size=world, total_steps=plan.total_steps, hidden_size=plan.hidden_size)
    # The tokenizer, answer-in-prompt and LoRA-target checks of `--dry-run` (seconds, no weights):
    # each would otherwise fail in every worker after the model load.
    from llara_dist.train.dry_run import cheap_checks

    prompts, counts = cheap_checks(cfg, meta, int(table.shape[1]))
    plan.checks = {"prompts": prompts, "counts": counts}
    return plan, table, rec_meta


def run_train(cfg: Config, *, replan: bool = False) -> dict:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final reported metrics.

    A resumed run keeps the plan it started with (`run_state.py`); ``replan`` lets the current
    config replace it (total steps, effective batch, seed, curriculum, ...), from the saved step on.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from llara_dist.ray_session import connect_ray
    from llara_dist.train.paths import check_paths_on_nodes, resolve_paths
    from llara_dist.train.worker import train_loop_per_worker

    # Workers run elsewhere, in another working directory: every path they get is absolute.
    cfg, relative = resolve_paths(cfg)
    plan, table, rec_meta = preflight(cfg, replan=replan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(plan.run_dir)})
    save_config(cfg, plan.run_dir / "config.yaml")
    print(f"llara-dist train: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), run dir {plan.run_dir}",
          flush=True)

    started = connect_ray(cfg)
    try:
        check_paths_on_nodes(cfg, relative)  # seconds, before any worker group starts
        item_table = ray.put(table)  # once; every worker maps the same shared-memory copy
        del table
        lo, hi = worker_range(cfg)
        scaling = ScalingConfig(
            num_workers=lo if lo == hi else (lo, hi),
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=dict(cfg.scaling.resources_per_worker),
            **({} if lo == hi else {"elastic_resize_monitor_interval_s": cfg.scaling.elastic_resize_monitor_interval_s}),
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "item_table": item_table,
                "use_gpu": cfg.scaling.use_gpu,
                "plan": {"run_dir": str(plan.run_dir), "hidden_size": plan.hidden_size,
                         "run": plan.run.to_dict(), "replan": replan},
            },
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=scaling,
            run_config=RunConfig(
                name=plan.name,
                storage_path=plan.storage_path,
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001  (re-raised; user input errors keep their one-line form)
            user_error = _find_user_error(e)
            if user_error is not None:
                raise user_error from None
            raise
    finally:
        if started:
            ray.shutdown()
    final = plan.run_dir / "final"
    if cfg.train.stop_after_steps and cfg.train.stop_after_steps < plan.total_steps:
        print(f"llara-dist train: stopped at step {cfg.train.stop_after_steps} of {plan.total_steps} "
              "(train.stop_after_steps); run the same command again to continue", flush=True)
        return dict(result.metrics or {})
    if not (final / "llara_config.json").is_file():
        raise CheckpointError(f"{final}: training finished but no export was written")
    print(f"llara-dist train: done; export in {final}", flush=True)
    return dict(result.metrics or {})


def _find_user_error(exc: BaseException) -> LlaraError | None:
    """The LlaraError a worker raised, if that is what failed the run (Ray wraps worker exceptions)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LlaraError):
            return e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        for attr in ("worker_failures", "errors"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(v for v in value.values() if isinstance(v, BaseException))
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, BaseException))
    return None
