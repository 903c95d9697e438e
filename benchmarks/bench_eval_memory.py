"""Peak host memory of one evaluation worker loading an export, against the checkpoint's size.

Saves a random Llama checkpoint (`save_pretrained`, bf16, safetensors) of the given shape, trains
nothing, exports a LLaRA model on it (`write_export`), then loads that export in a fresh process the
way an eval worker does (`load_export(..., device=...)`), runs one forward pass (so weights that are
only memory-mapped are counted once they are read) and reports the process's peak RSS above its
RSS after imports. Target: at most one copy of the weights per worker.

The peak is the child's own high-water mark (`VmHWM` in /proc/self/status). `getrusage`'s
`ru_maxrss` is not usable here: Linux carries it across `exec`, so a child started by this (large)
parent reports the parent's RSS as its peak.

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
import json, sys, psutil, torch
from llara_dist.model.llara import load_export

def status():  # this process's own figures, in bytes
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in f) if k in keys}

proc = psutil.Process()
base, uss0 = status()["VmRSS"], proc.memory_full_info().uss
cpu0 = sum(proc.cpu_times()[:2])
if sys.argv[3] == "host-first":  # the old way: build on the host, then move
    model, tok, _ = load_export(sys.argv[1], device="cpu")
    model.to(sys.argv[2])
else:
    model, tok, _ = load_export(sys.argv[1], device=sys.argv[2])
loaded = status()
if sys.argv[2] != "meta":  # an eval step reads every layer (memory-mapped weights become resident here)
    with torch.no_grad():
        ids = torch.tensor([[tok.bos_token_id] * 16], device=sys.argv[2])
        model.lm(input_ids=ids, attention_mask=torch.ones_like(ids))
after = status()
print(json.dumps({"rss_after_imports": base, "peak_load": loaded["VmHWM"], "peak_forward": after["VmHWM"],
                  "anon": after["RssAnon"], "file": after["RssFile"], "uss_added": proc.memory_full_info().uss - uss0,
                  "cpu_s": sum(proc.cpu_times()[:2]) - cpu0}))
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
        model = build_model(cfg, load_tokenizer(cfg.model, titles), rec_dim=64,
                            device="cpu" if args.device == "meta" else args.device)
        write_export(model, load_tokenizer(cfg.model, titles), export)
        del model
        ways = ["direct"] + (["host-first"] if args.device not in ("cpu", "meta") else [])
        results = {}
        for way in ways:
            out = subprocess.run([sys.executable, "-c", CHILD, str(export), args.device, way],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint: {size / 2**20:.0f} MiB bf16 safetensors (hidden {h}, {args.layers} layers, vocab {args.vocab}); "
          f"load_export onto {args.device!r} in a fresh process per way, then one forward pass")
    print("| way | RSS after imports | peak above imports: load | load + forward | copies of the weights | "
          "resident after: anon / file-backed | USS above imports | CPU s (load + forward) |")
    print("|---|---|---|---|---|---|---|---|")
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    for way, r in results.items():
        base = r["rss_after_imports"]
        name = "straight to the device (load_export(device=...))" if way == "direct" else "host first, then .to(device)"
        print(f"| {name} | {mib(base)} | {mib(r['peak_load'] - base)} | {mib(r['peak_forward'] - base)} | "
              f"**{(r['peak_forward'] - base) / size:.2f}** | {mib(r['anon'])} / {mib(r['file'])} | "
              f"{mib(r['uss_added'])} | {r['cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
