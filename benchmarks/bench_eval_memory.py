"""Peak host memory of one evaluation worker loading an export, against the checkpoint's size.

Saves a random Llama checkpoint (`save_pretrained`, bf16, safetensors) of the given shape, trains
nothing, exports a LLaRA model on it (`write_export`), then loads that export in a fresh process the
way an eval worker does (`load_export(..., device=...)`) and reports the process's peak RSS above
its RSS after imports. Target: at most one copy of the weights per worker.

    python benchmarks/bench_eval_memory.py                  # ~0.5 GB checkpoint on the CPU
    python benchmarks/bench_eval_memory.py --device cuda    # on a GPU node: host RAM per GPU worker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, psutil, torch
from llara_dist.model.llara import load_export
proc = psutil.Process()
base = proc.memory_info().rss
if sys.argv[3] == "host-first":  # the old way: build on the host, then move
    model, tok, _ = load_export(sys.argv[1], device="cpu")
    model.to(sys.argv[2])
else:
    model, tok, _ = load_export(sys.argv[1], device=sys.argv[2])
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_after_imports": base, "peak_rss": peak_kb * 1024, "rss_after_load": proc.memory_info().rss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llara_dist.config import load_config
    from llara_dist.data.tokenizer import build_tiny_tokenizer
    from llara_dist.model.llara import build_model, load_tokenizer, write_export

    with tempfile.TemporaryDirectory(prefix="bench-eval-mem-") as tmp:
        ckpt, export = Path(tmp) / "base", Path(tmp) / "export"
        titles = [f"Item {i} alpha beta" for i in range(400)]
        tok = build_tiny_tokenizer(titles, 1024)
        h = args.hidden
        cfg_hf = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=int(2.6875 * h),
                             num_hidden_layers=args.layers, num_attention_heads=max(1, h // 128),
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        # Drawn on the GPU when there is one (minutes on the host for a billion parameters).
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            LlamaForCausalLM(cfg_hf).to(torch.bfloat16).save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        cfg = load_config(None, [f"model.name_or_path={ckpt}", "model.dtype=bfloat16"])
        model = build_model(cfg, load_tokenizer(cfg.model, titles), rec_dim=64, device=args.device)
        write_export(model, load_tokenizer(cfg.model, titles), export)
        del model
        ways = ["direct"] + (["host-first"] if args.device != "cpu" else [])
        results = {}
        for way in ways:
            out = subprocess.run([sys.executable, "-c", CHILD, str(export), args.device, way],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint: {size / 2**20:.0f} MiB bf16 safetensors (hidden {h}, {args.layers} layers, vocab {args.vocab}); "
          f"load_export onto {args.device!r} in a fresh process per way")
    print("| way | RSS after imports | peak RSS | peak above imports | copies of the weights in host RAM |")
    print("|---|---|---|---|---|")
    for way, r in results.items():
        added = r["peak_rss"] - r["rss_after_imports"]
        name = "straight to the device (load_export(device=...))" if way == "direct" else "host first, then .to(device)"
        print(f"| {name} | {r['rss_after_imports'] / 2**20:.0f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | "
              f"{added / 2**20:.0f} MiB | **{added / size:.2f}** |")


if __name__ == "__main__":
    main()
