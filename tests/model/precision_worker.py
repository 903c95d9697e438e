"""One DeepSpeed rank (gloo, CPU) for test_precision: bf16/fp16 x ZeRO-2/3 x zero_init.

Run as ``python precision_worker.py CKPT OUT_JSON PORT``. For each case it builds the model from a
bf16 checkpoint saved like a real one, initialises a DeepSpeed engine (torch AdamW, nothing
compiled), takes one optimizer step and records what the precision contract promises: the
trainable weights in one (half) dtype, an fp32 master copy in the optimizer, and the export read
from that master copy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = [(stage, dtype, zero_init) for stage in (2, 3) for dtype in ("bfloat16", "float16")
         for zero_init in (False, True)]


def run_case(ckpt: str, stage: int, dtype: str, zero_init: bool) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from llara_dist.config import load_config
    from llara_dist.data.collate import TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.model.llara import build_model, load_tokenizer, trainable_parameters, write_export

    titles = [f"Movie {i} the great adventure" for i in range(12)]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.name_or_path={ckpt}", f"model.dtype={dtype}",
                                                        f"model.zero_init={str(zero_init).lower()}", "lora.dropout=0.0"])
    half = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 half: {"enabled": True, **({"initial_scale_power": 8} if half == "fp16" else {})},
                 "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
                 "steps_per_print": 10**9}
    tok = load_tokenizer(cfg.model, titles)
    model = build_model(cfg, tok, rec_dim=8, ds_config=ds_config)
    trainable = [p for _, p in trainable_parameters(model)]
    dtypes_before = sorted({str(p.dtype) for p in trainable})
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    samples = [{"key": f"u{i}", "history": [i, i + 1, i + 2], "target": i + 3, "candidates": [i + 3, i + 4, i + 5]}
               for i in range(2)]
    batch = TrainCollator(tok, 256)([build_prompt(s, titles, mode="hybrid", domain="movie", seed=0) for s in samples])
    table = torch.randn(len(titles), 8)
    for _ in range(2):
        loss = engine(**{k: batch[k] for k in ("input_ids", "attention_mask", "slots", "batch_items", "labels")},
                      item_table=table).loss
        engine.backward(loss)
        engine.step()
    names = dict(trainable_parameters(model))
    lora_b = next(n for n in names if "lora_B" in n)
    master = safe_get_full_fp32_param(names[lora_b])
    out = Path(tempfile.mkdtemp()) / "export"
    write_export(model, tok, out)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    key = next(k for k in adapter if "lora_B" in k and k.split("base_model.model.", 1)[-1].split(".lora_B")[0]
               in lora_b)
    return {"stage": stage, "dtype": dtype, "zero_init": zero_init, "loss": float(loss),
            "trainable_dtypes_before": dtypes_before,
            "trainable_dtypes_engine": sorted({str(p.dtype) for p in engine.module.parameters() if p.requires_grad}),
            "master_dtype": str(master.dtype), "export_dtype": str(adapter[key].dtype),
            "export_equals_master": bool(torch.equal(adapter[key], master.cpu())),
            "master_moved": bool(master.abs().sum() > 0)}


def main() -> None:
    ckpt, out_json, port = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    import gc

    for case in CASES:
        gc.collect()  # the previous case's model (and its HfDeepSpeedConfig under zero_init) is gone
        try:
            results.append(run_case(ckpt, *case))
        except Exception as e:  # recorded per case, so one failure does not hide the others
            results.append({"stage": case[0], "dtype": case[1], "zero_init": case[2], "error": repr(e)[:2000]})
    Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
