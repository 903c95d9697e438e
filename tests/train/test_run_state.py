"""The run contract (fast, no Ray): the plan is fixed at the start and kept on resume; remote fallback.

Through the real `llara-dist train` front door where it can refuse before any worker starts
(`plan_run` reads the plan saved with the run's latest checkpoint), and through `pick_checkpoint`
on a non-local `pyarrow.fs` filesystem for the fallback past a truncated latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llara_dist.config import load_config
from llara_dist.errors import ConfigError
from llara_dist.train.checkpoint import MANIFEST_DIR, STATE_FILE, TrainerState
from llara_dist.train.driver import plan_run
from llara_dist.train.run_state import RunPlan, make_plan, reconcile

ROOT = Path(__file__).resolve().parents[2]
N_TRAIN = 1024


def _cfg(tiny_shards, run_dir, *overrides):
    # The shape of configs/movielens.yaml: epoch-based, 8 workers, effective batch 8 x 4 x 2 = 64.
    return load_config(ROOT / "configs/tiny.yaml", [
        f"data.shards={tiny_shards}", f"run_dir={run_dir}", "train.max_steps=null", "train.epochs=5",
        "train.micro_batch_size=4", "train.grad_accum=2", "scaling.num_workers=8", *overrides])


def _write_checkpoint(files: dict[str, bytes], put) -> None:
    for rel, data in files.items():
        put(rel, data)


def _checkpoint_files(step: int, plan: RunPlan, world_size: int = 2) -> dict[str, bytes]:
    """A checkpoint directory's files (trainer state, manifests, rank files) as the worker writes them."""
    tag = f"global_step{step}"
    state = TrainerState(step=step, world_size=world_size, tag=tag, stream={"epoch": 0, "offset": 8 * step},
                         zero_stage=3, plan=plan.to_dict())
    files = {STATE_FILE: state.to_json().encode()}
    for r in range(world_size):
        name = f"{tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        files[name] = b"x" * (100 + r)
        files[f"{MANIFEST_DIR}/rank_{r:05d}.json"] = json.dumps({"files": {name: 100 + r}}).encode()
    return files


def _save_local(run_dir: Path, step: int, plan: RunPlan) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    for rel, data in _checkpoint_files(step, plan).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_fresh_plan_counts_epochs_at_the_intended_batch(tiny_shards, tmp_path):
    plan = plan_run(_cfg(tiny_shards, tmp_path / "run"), N_TRAIN).run
    assert plan.global_batch == 64 and plan.steps_per_epoch == N_TRAIN // 64 and plan.total_steps == 5 * (N_TRAIN // 64)
    assert plan.accumulation(4, 8) == 2 and plan.accumulation(4, 4) == 4 and plan.accumulation(2, 2) == 16
    with pytest.raises(ConfigError, match="3 workers x train.micro_batch_size 4 .* effective batch of 64"):
        plan.accumulation(4, 3)
    # An elastic range containing a size that cannot keep the batch is refused up front.
    with pytest.raises(ConfigError, match="scaling.num_workers: 3 workers"):
        make_plan(_cfg(tiny_shards, tmp_path / "run", "scaling.num_workers=[2,4]"), N_TRAIN, None)


def test_resume_on_fewer_workers_keeps_the_plan(tiny_shards, tmp_path):
    """The 5-epoch run planned on 8 workers, resumed on 4: total_steps and the effective batch hold
    (recomputed from the config, total_steps would double)."""
    run_dir = tmp_path / "run"
    started = plan_run(_cfg(tiny_shards, run_dir), N_TRAIN).run
    _save_local(run_dir, 10, started)
    resumed = plan_run(_cfg(tiny_shards, run_dir, "scaling.num_workers=4"), N_TRAIN).run
    fresh = make_plan(_cfg(tiny_shards, run_dir, "scaling.num_workers=4"), N_TRAIN, started.shards_fingerprint)
    assert fresh.total_steps == 2 * started.total_steps  # what an unchecked restart would do
    assert resumed == started
    assert resumed.accumulation(4, 4) == 4  # 4 workers x 4 micro x 4 accumulation = 64


def test_resume_with_another_seed_is_refused_naming_the_key(tiny_shards, tiny_rec, tmp_path, capsys):
    from llara_dist.cli import main

    run_dir = tmp_path / "run"
    ckpt = _save_local(run_dir, 10, plan_run(_cfg(tiny_shards, run_dir), N_TRAIN).run)
    with pytest.raises(ConfigError) as e:
        plan_run(_cfg(tiny_shards, run_dir, "train.seed=7"), N_TRAIN)
    msg = str(e.value)
    assert str(ckpt) in msg and "train.seed is 7 but the run was planned with 42" in msg and "--replan" in msg
    assert "\n" not in msg
    # Several changes are named together; a change of micro batch alone is not one (accumulation adapts).
    with pytest.raises(ConfigError, match="train.curriculum .*; train.lr"):
        plan_run(_cfg(tiny_shards, run_dir, "train.curriculum=hybrid_only", "train.lr=1e-3"), N_TRAIN)
    with pytest.raises(ConfigError, match=r"effective batch \(train.micro_batch_size x train.grad_accum"):
        plan_run(_cfg(tiny_shards, run_dir, "train.grad_accum=4"), N_TRAIN)
    assert plan_run(_cfg(tiny_shards, run_dir, "train.micro_batch_size=2", "train.grad_accum=4"), N_TRAIN).run \
        .global_batch == 64
    # The CLI refuses before connecting to Ray: one line, exit 2.
    code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), f"data.shards={tiny_shards}",
                 f"run_dir={run_dir}", "train.max_steps=null", "train.epochs=5", "train.grad_accum=2",
                 "scaling.num_workers=8", "train.seed=7", f"train.rec_dir={tiny_rec}"])
    err = capsys.readouterr().err
    assert code == 2 and "train.seed is 7 but the run was planned with 42" in err and "Traceback" not in err


def test_replan_accepts_the_new_plan(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    started = plan_run(_cfg(tiny_shards, run_dir), N_TRAIN).run
    _save_local(run_dir, 10, started)
    replanned = plan_run(_cfg(tiny_shards, run_dir, "train.seed=7", "scaling.num_workers=4"), N_TRAIN, replan=True).run
    assert replanned.seed == 7 and replanned.global_batch == 32 and replanned.total_steps == 2 * started.total_steps
    # The workers apply the same rules to the checkpoint they resume (here: the driver's plan).
    assert reconcile(started, replanned, replan=True, source="x") == replanned
    with pytest.raises(ConfigError, match="x: resuming would change the run: train.seed"):
        reconcile(started, replanned, replan=False, source="x")


def test_fallback_walks_remote_storage(tmp_path):
    """Storage on a non-local filesystem (fsspec's in-memory one, seen through pyarrow.fs): the latest
    checkpoint is truncated, so the previous one is found on the storage, downloaded and resumed."""
    import fsspec
    import pyarrow.fs
    import ray.train

    from llara_dist.train.checkpoint import pick_checkpoint

    mem = fsspec.filesystem("memory")
    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(mem))
    assert not isinstance(fs, pyarrow.fs.LocalFileSystem)
    root = f"/bucket-{tmp_path.name}/run"
    plan = make_plan(load_config(ROOT / "configs/tiny.yaml", ["data.shards=x"]), 400, "f" * 64)
    for step in (5, 10):
        for rel, data in _checkpoint_files(step, plan).items():
            with fs.open_output_stream(f"{root}/step_{step:08d}/{rel}") as f:
                f.write(data)
    with fs.open_output_stream(f"{root}/step_00000010/global_step10/zero_pp_rank_1_mp_rank_00_optim_states.pt") as f:
        f.write(b"x" * 3)  # truncated while being copied to storage
    latest = ray.train.Checkpoint(f"{root}/step_00000010", filesystem=fs)
    with pytest.warns(UserWarning, match="rank 1's file .* has 3 bytes, expected 101 .*resuming from step_00000005"):
        resume = pick_checkpoint(latest, world_size=2, rank=0)
    assert resume.state.step == 5 and resume.tag == "global_step5" and not resume.universal
    assert resume.path.is_dir() and resume.path.name == "step_00000005"  # a local copy DeepSpeed can load
    assert (resume.path / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").stat().st_size == 101
    assert RunPlan.from_dict(resume.state.plan) == plan
