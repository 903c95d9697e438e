"""Fault tolerance: kill a training worker at a random step and measure what it costs.

Runs the tiny 2-worker job twice on the same data: uninterrupted, and with one Ray Train worker
process killed (SIGKILL, by PID) at a random step after the first checkpoint, `scaling.max_failures`
letting Ray restart the group from the latest checkpoint. Reports the steps lost (trained again),
the time from the kill until training moved past the checkpoint again, and whether the final state
equals the uninterrupted run's (every logged loss, every exported adapter/projector tensor).

    python benchmarks/bench_fault.py [--steps 24] [--checkpoint-every 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())}


def _killer(run_dir: Path, at_step: int, record: dict, stop: threading.Event) -> None:
    import psutil

    while not stop.is_set():
        try:
            steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        except (OSError, ValueError):
            steps = []
        if steps and max(steps) >= at_step:
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            if workers:
                victim = random.Random(at_step).choice(workers)
                victim.kill()
                record.update(pid=victim.pid, step=max(steps), time=time.time())
                return
        time.sleep(0.02)


def _tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in ("adapter/adapter_model.safetensors", "projector.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(run_dir / "final" / name).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="picks the step at which a worker is killed")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()

    import ray

    from llara_dist.config import load_config
    from llara_dist.data.prepare import run_prepare
    from llara_dist.recommender.train import run_train_rec
    from llara_dist.train.driver import run_train

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-fault-"))
    shards, rec = work / "shards", work / "rec"
    base = [f"prepare.out={shards}", f"data.shards={shards}", f"rec.out={rec}", f"train.rec_dir={rec}",
            "prepare.users=200", "prepare.items=120", "prepare.samples_per_shard=400", "rec.epochs=3",
            f"train.max_steps={a.steps}", f"train.checkpoint_every={a.checkpoint_every}", "train.log_every=1",
            "scaling.num_workers=2"]
    cfg = load_config(ROOT / "configs/tiny.yaml", base)
    if not (shards / "meta.json").is_file():
        run_prepare(cfg)
    if not (rec / "item_embeddings.safetensors").is_file():
        run_train_rec(cfg)

    kill_at = random.Random(a.seed).randint(a.checkpoint_every + 1, a.steps - 2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        ref_dir, bad_dir = work / "uninterrupted", work / "killed"
        t0 = time.time()
        run_train(load_config(ROOT / "configs/tiny.yaml", base + [f"run_dir={ref_dir}"]))
        t_ref = time.time() - t0
        record: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=_killer, args=(bad_dir, kill_at, record, stop), daemon=True)
        killer.start()
        t0 = time.time()
        run_train(load_config(ROOT / "configs/tiny.yaml", base + [f"run_dir={bad_dir}", "scaling.max_failures=2"]))
        t_bad = time.time() - t0
        stop.set()
    finally:
        ray.shutdown()
    if not record:
        raise SystemExit("the run finished before a worker could be killed; use more --steps")

    ref, bad = _rows(ref_dir), _rows(bad_dir)
    # Observed, not assumed: the first step logged after the kill tells where the run resumed
    # (Ray registers a checkpoint at its next poll, so a kill right after one may resume earlier).
    after = sorted(s for s, r in bad.items() if r["time"] > record["time"])
    ckpt_step = after[0] - 1 if after else 0
    lost = record["step"] - ckpt_step
    recover = bad[after[0]]["time"] - record["time"] if after else float("nan")
    loss_diff = max(abs(ref[s]["loss"] - bad[s]["loss"]) for s in ref)
    ta, tb = _tensors(ref_dir), _tensors(bad_dir)
    tensor_diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    same = sorted(ref) == sorted(bad) and loss_diff == 0.0 and tensor_diff == 0.0

    print(f"\ntiny LLaRA, 2 workers, {a.steps} steps, checkpoint every {a.checkpoint_every}; "
          f"worker pid {record['pid']} killed after step {record['step']}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| steps lost (trained again from step {ckpt_step}) | {lost} |")
    print(f"| time from kill to the first step after it (restart + reload + 1 step) | {recover:.1f} s |")
    print(f"| wall time uninterrupted / with the kill | {t_ref:.1f} s / {t_bad:.1f} s |")
    print(f"| max |loss difference| over all {len(ref)} steps | {loss_diff:.3g} |")
    print(f"| max |difference| of exported adapter + projector tensors | {tensor_diff:.3g} |")
    print(f"| final state equals the uninterrupted run's | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
