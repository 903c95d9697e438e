"""`llara-dist train --dry-run` on every shipped config x every shipped DeepSpeed template, against
a real-format local checkout (Llama config.json + saved tokenizer, no weights), through the CLI.

No Ray, no weights: each run takes seconds. The shipped paper configs keep ``scaling.use_gpu:
true``, so the DeepSpeed configs are filled and checked for their GPU target on this CPU machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llara_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
TEMPLATES = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """benchmarks/_models.py's config-only checkout of the smoke preset (a Llama config.json and
    a tokenizer saved with save_pretrained), the format of a real local checkpoint directory."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _models import config_only_checkout
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return config_only_checkout("smoke", tmp_path_factory.mktemp("models"))


def _dry_run(capsys, config: str, *overrides: str) -> tuple[int, str, str]:
    import ray

    code = main(["train", "--config", str(ROOT / "configs" / config), "--dry-run", *overrides])
    out, err = capsys.readouterr()
    assert not ray.is_initialized()  # no cluster, no workers
    assert "Traceback" not in err
    return code, out, err


def _paths(checkout, tiny_shards, tiny_rec, tmp_path) -> list[str]:
    return [f"model.name_or_path={checkout}", f"data.shards={tiny_shards}", f"train.rec_dir={tiny_rec}",
            f"run_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_with_every_template(config, template, checkout, tiny_shards, tiny_rec, tmp_path,
                                                  capsys):
    from llara_dist.config import load_config

    cfg = load_config(ROOT / "configs" / config)
    code, out, err = _dry_run(capsys, config, *_paths(checkout, tiny_shards, tiny_rec, tmp_path),
                              f"train.ds_config=ds_configs/{template}")
    assert code == 0, err
    assert "all checks passed" in out
    workers = cfg.scaling.num_workers
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum * workers
    assert f"= {effective} samples/step" in out
    assert ("GPU (nccl)" if cfg.scaling.use_gpu else "CPU (gloo)") in out
    stage = json.loads((ROOT / "ds_configs" / template).read_text())["zero_optimization"]["stage"]
    assert f"ZeRO-{stage}" in out
    assert "64 prompts (hybrid + text)" in out
    assert "curriculum" in out and cfg.train.curriculum in out
    assert "LoRA (r=" in out and "model states total" in out


def test_memory_estimate_follows_the_zero_stage():
    """ZeRO-3 shards the frozen base over the ranks, ZeRO-2 keeps a whole copy per GPU; the
    trainable states (18 bytes/param over the ranks) come from DeepSpeed's own estimators."""
    from llara_dist.train.dry_run import ParamCounts, memory_estimate

    counts = ParamCounts("LlamaForCausalLM", base=6_738_423_808, lora=19_988_480, projector=16_781_312,
                         largest_layer=131_072_000, base_rows=32_000, rows=32_003)
    z3 = memory_estimate(counts, {"zero_optimization": {"stage": 3}}, 8, "bfloat16")
    z2 = memory_estimate(counts, {"zero_optimization": {"stage": 2}}, 8, "bfloat16")
    assert z3["frozen_base"] == counts.base * 2 / 8
    assert z2["frozen_base"] == counts.base * 2
    assert z2["trainable_states"] == 2 * counts.trainable + int(18 * counts.trainable / 8)
    assert z3["trainable_states"] == int(18 * counts.trainable / 8)
    assert z3["gather"] == counts.largest_layer * 2
    assert z3["gpu_total"] < z2["gpu_total"]
    off = memory_estimate(counts, {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                          "offload_optimizer": {"device": "cpu"}}}, 8, "bfloat16")
    assert off["frozen_base"] == 0 and off["host"] >= counts.base * 2


def test_contradicting_deepspeed_config_exits_2_naming_the_key(checkout, tiny_shards, tiny_rec, tmp_path, capsys):
    tree = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    tree["optimizer"]["params"]["lr"] = 1e-3  # movielens.yaml trains at 8e-4
    bad = tmp_path / "zero3_lr.json"
    bad.write_text(json.dumps(tree))
    code, out, err = _dry_run(capsys, "movielens.yaml", *_paths(checkout, tiny_shards, tiny_rec, tmp_path),
                              f"train.ds_config={bad}")
    assert code == 2
    assert str(bad) in err and "optimizer.params.lr" in err and "train.lr" in err
    assert "all checks passed" not in out


def test_missing_lora_target_exits_2_naming_the_key(checkout, tiny_shards, tiny_rec, tmp_path, capsys):
    code, out, err = _dry_run(capsys, "movielens.yaml", *_paths(checkout, tiny_shards, tiny_rec, tmp_path),
                              "lora.target_modules=[q_proj,query_key_value]")
    assert code == 2
    assert "lora.target_modules" in err and "query_key_value" in err and "config.json" in err


def test_missing_model_directory_exits_2_naming_the_key(tiny_shards, tiny_rec, tmp_path, capsys):
    code, _, err = _dry_run(capsys, "movielens.yaml", *_paths(tmp_path / "absent", tiny_shards, tiny_rec, tmp_path))
    assert code == 2
    assert "model.name_or_path" in err and "absent" in err


def _gpt2_style_checkout(titles: list[str], out: Path) -> Path:
    """A Llama config.json + a byte-level BPE trained on titles that follow a space (as GPT-2 /
    Llama-3 / Qwen vocabularies are): ``ĠThe`` is a token, ``The`` at the start of a text is not it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from llara_dist.data.tokenizer import BOS, EOS, UNK, prepare_tokenizer

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([f"a, {t}" for t in titles] * 3, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[BOS, EOS, UNK], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                                     unk_token=UNK))
    fast.save_pretrained(out)
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1024, architectures=["LlamaForCausalLM"]).save_pretrained(out)
    return out


def test_answer_tokens_missing_from_the_prompt_exit_2(tiny_shards, tiny_rec, tmp_path, capsys, monkeypatch):
    """The bug `encode_answers` exists for: a byte-level BPE encodes a title at the start of a text
    differently from the same title after a space. Encoding answers naively must be caught."""
    import llara_dist.data.collate as collate
    from llara_dist.data.shards import load_titles

    model = _gpt2_style_checkout(load_titles(tiny_shards), tmp_path / "model")
    args = _paths(model, tiny_shards, tiny_rec, tmp_path)
    code, _, err = _dry_run(capsys, "movielens.yaml", *args)
    assert code == 0, err  # the real encoding passes

    def naive(tokenizer, answers):
        return [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]

    monkeypatch.setattr(collate, "encode_answers", naive)
    code, out, err = _dry_run(capsys, "movielens.yaml", *args)
    assert code == 2
    assert str(tiny_shards) in err and "do not occur in the prompt" in err
