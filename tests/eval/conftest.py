"""Shared by the evaluation tests: a tiny exported run and one Ray session for the whole module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..conftest import tiny_config


def make_export(shards: Path, rec: Path, run: Path):
    """An exported tiny LLaRA: random base, LoRA B perturbed so the adapter matters.

    The untrained tiny model says the same thing whatever the prompt (its final hidden state is
    nearly input-independent) and favours the pad/unk rows; a re-drawn LM head makes it at least
    emit ordinary text. Constrained and score decoding still differ per sample (the candidates do).
    """
    from llara_dist.config import save_config
    from llara_dist.data.shards import load_meta, load_titles
    from llara_dist.model.llara import build_model, load_tokenizer, write_export
    from llara_dist.recommender.table import load_item_table

    cfg = tiny_config(f"data.shards={shards}", f"train.rec_dir={rec}", f"run_dir={run}", "eval.max_new_tokens=24")
    titles = load_titles(shards)
    table, _ = load_item_table(rec, load_meta(shards))
    tok = load_tokenizer(cfg.model, titles)
    model = build_model(cfg, tok, table.shape[1])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapter would be a no-op
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        head = model.lm.get_base_model().get_output_embeddings().weight
        head.copy_(0.5 * torch.randn(head.shape, generator=gen))
    write_export(model, tok, run / "final")
    save_config(cfg, run / "config.yaml")
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tiny_rec, tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = make_export(tiny_shards, tiny_rec, run)
    return cfg, run


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():  # another module's session is still up: share it
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
