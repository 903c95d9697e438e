"""One rank of the ZeRO-3 model check (run by test_zero3.py as separate processes).

Each rank builds the same tiny LLaRA model, keeps an unpartitioned copy as the reference, wraps
the model in a real DeepSpeed ZeRO-3 engine (every parameter partitioned across the ranks), and
records what the test asserts on: losses, generations (with ranks stopping at different steps),
local vs full parameter sizes, and the export written from the partitions.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

TITLES = [f"Film {w} ({1970 + i})" for i, w in enumerate(["Red", "Blue", "Green", "Gold", "Grey", "Pink"] * 4)]
REC_DIM = 8


def _samples(rank: int) -> list[dict]:
    rng = np.random.default_rng(100 + rank)
    out = []
    for u in range(2):
        history = rng.choice(len(TITLES), size=int(rng.integers(2, 5)), replace=False).tolist()
        target = int(rng.integers(len(TITLES)))
        candidates = [i for i in rng.permutation(len(TITLES)).tolist() if i != target][:2] + [target]
        out.append({"key": f"r{rank}u{u}", "user": u, "history": history, "target": target, "candidates": candidates})
    return out


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    from llara_dist.config import load_config
    from llara_dist.data.collate import GenerationCollator, TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.model.llara import build_model, load_export, load_tokenizer, write_export

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                      ["model.tiny.vocab_size=300", "lora.dropout=0.0"])
    tokenizer = load_tokenizer(cfg.model, TITLES)
    model = build_model(cfg, tokenizer, REC_DIM)
    reference = copy.deepcopy(model).eval()
    table = np.random.default_rng(0).standard_normal((len(TITLES) + 1, REC_DIM)).astype(np.float32)
    table.setflags(write=False)

    prompts = [build_prompt(s, TITLES, mode="hybrid", domain="movie", seed=0) for s in _samples(rank)]
    train = TrainCollator(tokenizer, 256)(prompts)
    gen = GenerationCollator(tokenizer, 256)(prompts)
    train_args = {k: train[k] for k in ("input_ids", "attention_mask", "slots", "batch_items", "labels")}
    gen_args = (gen["input_ids"], gen["attention_mask"], gen["slots"], gen["batch_items"], table)

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 10**9}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    q = model.lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    result = {"q_local": int(q.ds_tensor.numel()), "q_full": int(q.ds_numel)}

    with torch.no_grad():
        engine.eval()
        result["loss_zero3"] = float(engine(**train_args, item_table=table).loss)
        result["loss_plain"] = float(reference(**train_args, item_table=table).loss)
        plain = reference.generate(*gen_args, max_new_tokens=5, stop_token_ids=[])
        # Rank 0 stops every row at its first token; rank 1 decodes all 5 steps. Each forward is a
        # collective, so rank 0 must keep stepping (sync) until rank 1 is done.
        stops = sorted({row[0] for row in plain}) if rank == 0 else []
        result["gen_zero3"] = model.generate(*gen_args, max_new_tokens=5, stop_token_ids=stops)
        result["gen_plain"] = reference.generate(*gen_args, max_new_tokens=5, stop_token_ids=stops)

    engine.train()
    loss = engine(**train_args, item_table=table).loss
    engine.backward(loss)
    engine.step()
    # A text step: the projector takes no part in the forward (nothing to inject); the ZeRO-3
    # step must still go through on every rank.
    text = TrainCollator(tokenizer, 256)([build_prompt(s, TITLES, mode="text", domain="movie", seed=0)
                                          for s in _samples(rank)])
    assert text["batch_items"].numel() == 0
    text_loss = engine(**{k: text[k] for k in train_args}, item_table=table).loss
    engine.backward(text_loss)
    engine.step()
    result["text_step_loss"] = float(text_loss)
    engine.eval()
    with torch.no_grad():
        embeds = model.embed(gen["input_ids"], gen["slots"], gen["batch_items"], table)
        logits = model.lm_logits(embeds, gen["attention_mask"])
    write_export(model, tokenizer, Path(out_dir) / "final", extra_config={"trained_steps": 2})
    torch.distributed.barrier()
    if rank == 0:
        loaded, _, llara = load_export(Path(out_dir) / "final")
        with torch.no_grad():
            got = loaded.lm_logits(loaded.embed(gen["input_ids"], gen["slots"], gen["batch_items"], table),
                                   gen["attention_mask"])
        result["export_max_abs_diff"] = float((got - logits).abs().max())
        result["export_logits_moved"] = float((logits - reference.lm_logits(
            reference.embed(gen["input_ids"], gen["slots"], gen["batch_items"], table), gen["attention_mask"])).abs().max())
        result["trained_steps"] = llara["trained_steps"]
    result.update(_zero_init_phase(rank, out_dir, ds_config, table))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def _plain_tokenizer():
    """A checkpoint-style tokenizer that lacks the LLaRA tokens (like Llama-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TITLES + ["This user has watched these movies. Answer:"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _zero_init_phase(rank: int, out_dir: str, ds_config: dict, table: np.ndarray) -> dict:
    """A local checkpoint loaded straight into partitions (model.zero_init), resized under ZeRO-3."""
    import deepspeed

    from llara_dist.config import load_config
    from llara_dist.data.collate import TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.model.llara import build_model, load_tokenizer
    from llara_dist.model.tiny import build_tiny_llama

    ckpt = Path(out_dir) / "checkpoint"
    base_cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", ["lora.dropout=0.0"])
    if rank == 0:
        tok = _plain_tokenizer()
        build_tiny_llama(base_cfg.model.tiny, tok, len(tok)).save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
    torch.distributed.barrier()
    cfg = load_config(None, ["lora.dropout=0.0", f"model.name_or_path={ckpt}", "model.zero_init=true"])
    tokenizer = load_tokenizer(cfg.model, TITLES)
    plain = build_model(cfg, tokenizer, REC_DIM).eval()  # no ds_config: built whole
    partitioned = build_model(cfg, tokenizer, REC_DIM, ds_config=ds_config)
    q = partitioned.lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    # transformers' resize swaps in a whole (unpartitioned) embedding; deepspeed.initialize
    # partitions it with everything else.
    emb = partitioned.lm.get_input_embeddings().weight
    out = {"zi_partitioned_at_build": bool(hasattr(q, "ds_id")) and q.numel() == 0,
           "zi_vocab": [len(tokenizer), int(getattr(emb, "ds_shape", emb.shape)[0])],
           "zi_base_vocab": partitioned.meta["base_vocab_size"]}
    with deepspeed.zero.GatheredParameters([emb]):
        out["zi_rows_equal"] = bool(torch.equal(emb.detach(), plain.lm.get_input_embeddings().weight))
    trainable = [p for p in partitioned.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=partitioned, model_parameters=trainable, config=ds_config)
    engine.eval()
    prompts = [build_prompt(s, TITLES, mode="hybrid", domain="movie", seed=0) for s in _samples(rank)]
    batch = TrainCollator(tokenizer, 256)(prompts)
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "slots", "batch_items", "labels")}
    with torch.no_grad():
        out["zi_loss_zero3"] = float(engine(**args, item_table=table).loss)
        out["zi_loss_plain"] = float(plain(**args, item_table=table).loss)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
