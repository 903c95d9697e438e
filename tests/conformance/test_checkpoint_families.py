"""Conformance matrix: the shipped paper config on three real checkpoint families, end to end.

What a real user runs, through the real stack: `configs/movielens.yaml` (ZeRO-3 template, bf16,
`model.zero_init: true`, LoRA r=8, gradient checkpointing) with only the model path, the data and
the sizes overridden, 2 Ray workers with DeepSpeed ZeRO-3 over gloo. The checkpoints are tiny and
random but have the layout of the real families, saved with `save_pretrained` in bf16, and their
tokenizers are built here with the `tokenizers` library (no downloads):

- ``llama2``: metaspace BPE with byte fallback, BOS, no pad, separate LM head;
- ``llama3``: byte-level BPE, BOS, no pad;
- ``qwen2``:  byte-level BPE, no BOS, pad = EOS, padded (spare) embedding rows, tied embeddings.

For each: the training data's tokens (answer tokens are the candidate's tokens in the prompt, at
most one BOS, labels = answer + EOS), train a few steps, the export (non-empty adapter tensors,
placeholder rows set), plain `PeftModel.from_pretrained` on the original checkpoint reproduces the
trained model (rebuilt from the DeepSpeed checkpoint's partitions), and eval with free,
constrained and score decoding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llara_dist.config import load_config

from tests.conformance.families import FAMILIES, SENTINEL, make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------
# Fixtures: one Ray session, one trained run per family


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def _cfg(ckpt: Path, shards: Path, rec: Path, run_dir: Path, *extra: str):
    """The shipped paper config with only the model path, data, sizes and machine overridden."""
    return load_config(ROOT / "configs/movielens.yaml", [
        f"model.name_or_path={ckpt}", f"data.shards={shards}", f"train.rec_dir={rec}", f"run_dir={run_dir}",
        "train.micro_batch_size=2", "train.grad_accum=1", f"train.max_steps={STEPS}", "train.warmup_steps=1",
        "train.log_every=1", f"train.checkpoint_every={STEPS}", "train.valid_every=",
        "scaling.num_workers=2", "scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 1}",
        "scaling.max_failures=0", "eval.num_workers=1", "eval.batch_size=4", "eval.max_samples=4",
        "eval.max_new_tokens=8", *extra])


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, ray_session, tiny_shards, tiny_rec, tmp_path_factory):
    from llara_dist.data.shards import load_titles
    from llara_dist.train.driver import run_train

    family = request.param
    root = tmp_path_factory.mktemp(family)
    ckpt = make_checkpoint(family, load_titles(tiny_shards), root / "checkpoint")
    run_dir = root / "run"
    cfg = _cfg(ckpt, tiny_shards, tiny_rec, run_dir)
    assert cfg.model.zero_init and cfg.model.dtype == "bfloat16" and cfg.train.ds_config.endswith("zero3.json")
    run_train(cfg)
    return family, ckpt, run_dir, cfg


# ----------------------------------------------------------------------------------------------
# The matrix


def _sublist_at(seq: list[int], sub: list[int]) -> int:
    return next((i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub), -1)


def test_training_tokens(trained):
    """The tokens the workers train on: answer = the candidate's tokens in the prompt, at most one
    BOS, labels = answer + EOS."""
    from llara_dist.data.collate import IGNORE_INDEX, TrainCollator
    from llara_dist.data.prompts import CANDIDATE_TOKEN, build_prompt
    from llara_dist.data.shards import load_titles, read_split
    from llara_dist.model.llara import load_tokenizer

    family, _, _, cfg = trained
    titles = load_titles(cfg.data.shards)
    tok = load_tokenizer(cfg.model, titles)
    samples = [s for _, s in zip(range(8), read_split(cfg.data.shards, "valid"))]
    prompts = [build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in samples]
    batch = TrainCollator(tok, cfg.data.max_length)(prompts)
    cans = tok.convert_tokens_to_ids(CANDIDATE_TOKEN)
    for p, ids, labels, mask in zip(prompts, batch["input_ids"].tolist(), batch["labels"].tolist(),
                                    batch["attention_mask"].tolist()):
        ids = ids[:sum(mask)]
        answer = [t for t in labels if t != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id and answer[:-1], f"{family}: labels {answer} are not answer + EOS"
        answer = answer[:-1]
        assert tok.decode(answer).strip() == p.answer
        prompt_ids = ids[:len(ids) - len(answer) - 1]
        at = _sublist_at(prompt_ids, answer)
        assert at >= 0, f"{family}: answer tokens {answer} do not occur in the prompt"
        # ... and where they occur the candidate's placeholder follows (its title, then [CansEmb]).
        follows = prompt_ids[at + len(answer):at + len(answer) + 2]
        assert cans in follows, f"{family}: the answer's tokens are not the candidate's ({follows})"
        n_bos = ids.count(tok.bos_token_id) if tok.bos_token_id is not None else 0
        assert n_bos == (0 if family == "qwen2" else 1), f"{family}: {n_bos} BOS tokens"
    if family == "qwen2":
        assert tok.pad_token_id == tok.eos_token_id  # the checkpoint's own choice is kept


def test_training_ran_and_export_is_complete(trained):
    from safetensors.torch import load_file

    from llara_dist.data.prompts import SPECIAL_TOKENS

    family, ckpt, run_dir, _ = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    final = run_dir / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values()), "empty adapter tensors (ungathered ZeRO-3)"
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B never moved from its zero init"
    llara = json.loads((final / "llara_config.json").read_text())
    ids = [llara["special_token_ids"][t] for t in SPECIAL_TOKENS]
    assert set(ids) <= set(llara["initialized_rows"])
    special = load_file(final / "special_tokens.safetensors")
    rows_of = dict(zip(special["token_ids"].tolist(), special["input_rows"].float()))
    base_emb = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    for i in ids:
        row = rows_of[i]
        assert torch.isfinite(row).all() and row.abs().sum() > 0
        assert not torch.all(row == SENTINEL), f"{family}: placeholder row {i} kept the checkpoint's spare row"
    if family == "qwen2":
        assert llara["base_vocab_size"] == base_emb and llara["vocab_size"] <= base_emb  # spare rows used, no resize
    else:
        assert llara["vocab_size"] > base_emb  # rows added for the placeholders (and pad)


def test_plain_peft_load_reproduces_the_trained_model(trained, tmp_path):
    """`PeftModel.from_pretrained` on the original checkpoint (+ the exported new-token rows) gives
    the logits of the model rebuilt from the DeepSpeed checkpoint's fp32 partitions."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llara_dist.eval.evaluate import export_from_checkpoint
    from llara_dist.model.llara import load_export

    family, ckpt, run_dir, cfg = trained
    final = run_dir / "final"
    latest = sorted(p.parent for p in run_dir.rglob("latest"))
    assert latest, "no DeepSpeed checkpoint written"
    rebuilt = export_from_checkpoint(cfg, latest[-1], tmp_path / "from-checkpoint")
    trained_model, tok, llara = load_export(rebuilt)

    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    if base.get_input_embeddings().weight.shape[0] < llara["vocab_size"]:
        base.resize_token_embeddings(llara["vocab_size"], mean_resizing=False)
    special = load_file(final / "special_tokens.safetensors")
    with torch.no_grad():
        idx = special["token_ids"]
        base.get_input_embeddings().weight[idx] = special["input_rows"].to(torch.bfloat16)
        if "output_rows" in special and base.get_output_embeddings().weight is not base.get_input_embeddings().weight:
            base.get_output_embeddings().weight[idx] = special["output_rows"].to(torch.bfloat16)
    peft = PeftModel.from_pretrained(base, final / "adapter", autocast_adapter_dtype=False).eval()

    text = "Movie history: Answer: the"
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = trained_model.lm(input_ids=ids).logits.float()
        got = peft(input_ids=ids).logits.float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)
    # The adapter matters: without it the logits differ (so the comparison above can fail).
    with torch.no_grad(), peft.disable_adapter():
        without = peft(input_ids=ids).logits.float()
    assert not torch.allclose(without, want), f"{family}: the adapter changes nothing"


@pytest.mark.parametrize("decoding", ["free", "constrained", "score"])
def test_eval_decodings(trained, decoding):
    import csv

    from llara_dist.eval.evaluate import run_eval

    family, _, run_dir, _ = trained
    cfg = load_config(run_dir / "config.yaml", [f"eval.decoding={decoding}", "eval.split=valid", "eval.max_samples=4"])
    out = run_dir / "eval" / decoding
    metrics = run_eval(cfg, run_dir, out_dir=out)
    assert metrics["decoding"] == decoding
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    if decoding == "constrained":  # the trie only allows a candidate's tokens: always a valid answer
        assert all(r["valid"] == "1" for r in rows), f"{family}: constrained decoding left the candidates"
    if decoding == "score":  # one finite score per candidate
        for r in rows:
            scores = [float(x) for x in r["scores"].split()]
            assert len(scores) == len(r["candidates"].split()) and all(map(math.isfinite, scores))
