"""`llara-dist pretrain-base`: a few full-parameter steps lower the LM loss, and the saved directory
loads through the ordinary local-checkpoint path (`model.name_or_path=DIR`) like a real Llama."""

from __future__ import annotations

import json

import torch

from llara_dist.cli import main
from llara_dist.data.shards import load_titles
from llara_dist.model.llara import build_model, load_tokenizer
from llara_dist.model.warm_base import SUMMARY_NAME
from tests.conftest import TINY_CONFIG, tiny_config


def test_pretrain_base_learns_and_loads_as_local_checkpoint(tiny_shards, tmp_path):
    out = tmp_path / "warm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast for a tiny model, and far faster on shared cores
    try:
        rc = main(["pretrain-base", "--config", str(TINY_CONFIG), "--out", str(out), "--steps", "40",
                   f"data.shards={tiny_shards}", "pretrain.batch_size=4", "pretrain.warmup_steps=5"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert len(summary["losses"]) == 40
    # Full-parameter training on the prompts must move the loss well below its random start.
    assert summary["loss_last"] < 0.75 * summary["loss_first"], summary
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    titles = load_titles(tiny_shards)
    cfg = tiny_config(f"data.shards={tiny_shards}", f"model.name_or_path={out}")
    tokenizer = load_tokenizer(cfg.model, titles)
    tiny_tok = load_tokenizer(tiny_config().model, titles)
    sample = f"{titles[3]} [PH], {titles[5]} [HistoryEmb]"
    assert tokenizer(sample)["input_ids"] == tiny_tok(sample)["input_ids"]  # same ids as in pretraining

    model = build_model(cfg, tokenizer, rec_dim=16)
    # The checkpoint covers the whole tokenizer: no rows were added on load.
    assert model.meta["base_vocab_size"] == len(tokenizer)
    base = model.lm.get_base_model()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)
    # Trained weights, not the seeded random init of the tiny preset.
    from llara_dist.model.tiny import build_tiny_llama

    random_init = build_tiny_llama(cfg.model.tiny, tiny_tok, len(tiny_tok))
    assert not torch.allclose(saved.model.layers[0].mlp.up_proj.weight, random_init.model.layers[0].mlp.up_proj.weight)
    # Only LoRA and the projector train on top of it, as with a real checkpoint.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
