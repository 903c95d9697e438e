"""Session fixtures shared by every area's tests.

They build real artefacts through the real code (no mocks): a small synthetic shard directory
(`llara-dist prepare`) and a recommender trained on it (`llara-dist train-rec`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed picks its CPU accelerator (gloo) on machines without CUDA; set it before any import.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def tiny_config(*overrides: str):
    """The tiny CPU config with dotted overrides (tests' single source of settings)."""
    from llara_dist.config import load_config

    return load_config(TINY_CONFIG, list(overrides))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A small synthetic data set, prepared once per test session."""
    from llara_dist.data.prepare import run_prepare

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    run_prepare(tiny_config(f"prepare.out={out}", "prepare.users=200", "prepare.items=120",
                            "prepare.samples_per_shard=400"))
    return out


@pytest.fixture(scope="session")
def tiny_rec(tiny_shards, tmp_path_factory) -> Path:
    """A SASRec trained briefly on `tiny_shards`, with its frozen item table exported."""
    import torch

    from llara_dist.recommender.train import run_train_rec

    out = tmp_path_factory.mktemp("rec")
    # One intra-op thread: as fast for a tiny model, and far faster on shared cores (no spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train_rec(tiny_config(f"data.shards={tiny_shards}", f"rec.out={out}", "rec.epochs=5"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out
