"""`llara-dist demo`: the embedded default end to end on a CPU machine.

synthetic data -> OUT/shards, SASRec -> OUT/rec, a warm tiny base -> OUT/warm_base (the CPU
stand-in for a pretrained LLM, loaded like a local Llama checkout), LLaRA training with Ray
workers -> OUT/run, evaluation on the test split -> OUT/run/eval/test. Each stage is the same function the
corresponding subcommand calls, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llara_dist.config import Config, load_config

_REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def demo_config(out: str | Path, workers: int, config: str | None = None, overrides: list[str] | None = None) -> Config:
    """The tiny config, pointed at OUT, with the caller's overrides applied last."""
    base = config or (_REPO_CONFIG if _REPO_CONFIG.is_file() else None)
    out = Path(out).resolve()
    wired = [
        f"prepare.out={out / 'shards'}",
        f"data.shards={out / 'shards'}",
        f"rec.out={out / 'rec'}",
        f"train.rec_dir={out / 'rec'}",
        f"run_dir={out / 'run'}",
        f"pretrain.out={out / 'warm_base'}",
        "pretrain.steps=100",
        f"scaling.num_workers={workers}",
        f"eval.num_workers={workers}",
    ]
    return load_config(base, wired + list(overrides or []))


def _stage(n: int, title: str) -> float:
    print(f"\n=== [{n}/5] {title}", flush=True)
    return time.perf_counter()


def run_demo(out: str | Path = "demo", workers: int = 2, config: str | None = None,
             overrides: list[str] | None = None) -> dict:
    from llara_dist.data.prepare import run_prepare
    from llara_dist.eval.evaluate import run_eval
    from llara_dist.model.warm_base import pretrain_base
    from llara_dist.recommender.train import run_train_rec
    from llara_dist.train.driver import run_train

    cfg = demo_config(out, workers, config, overrides)
    timings = {}

    t = _stage(1, f"prepare synthetic data -> {cfg.prepare.out}")
    run_prepare(cfg)
    timings["prepare"] = time.perf_counter() - t

    t = _stage(2, f"train {cfg.rec.model} recommender -> {cfg.rec.out}")
    run_train_rec(cfg)
    timings["train-rec"] = time.perf_counter() - t

    if cfg.model.name_or_path == "tiny":
        t = _stage(3, f"warm the tiny base ({cfg.pretrain.steps} causal-LM steps) -> {cfg.pretrain.out}")
        pretrain_base(cfg)
        timings["pretrain-base"] = time.perf_counter() - t
        # From here on the base is a local Hugging Face checkpoint, exactly like a real LLM's.
        cfg.model.name_or_path = str(cfg.pretrain.out)
    else:
        _stage(3, f"base model {cfg.model.name_or_path} is already pretrained: nothing to warm")

    t = _stage(4, f"train LLaRA ({workers} Ray workers, DeepSpeed ZeRO-3, LoRA) -> {cfg.run_dir}")
    run_train(cfg)
    timings["train"] = time.perf_counter() - t

    t = _stage(5, f"evaluate on the {cfg.eval.split} split")
    run_eval(cfg, run_dir=cfg.run_dir)
    timings["eval"] = time.perf_counter() - t

    metrics_path = Path(cfg.run_dir) / "eval" / cfg.eval.split / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    print("\n=== demo finished")
    print(f"{'stage':<15}{'seconds':>10}")
    for stage, secs in timings.items():
        print(f"{stage:<15}{secs:>10.1f}")
    print(f"\nresults: {metrics_path}")
    return {"timings": timings, "metrics": metrics}
