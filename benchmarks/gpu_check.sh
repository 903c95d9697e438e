#!/usr/bin/env bash
# GPU validation kit: one script, one table, for a GPU node with this repository and its Python
# environment. Each check runs in its own process with its own time limit; a failing check is a row
# that says so (its log is kept), and the others still run.
#
#   benchmarks/gpu_check.sh [--out DIR]     # on one GPU: under 8 minutes
#   benchmarks/gpu_check.sh --smoke         # the same checks at tiny sizes on the CPU (the test suite)
#
# The checks:
#   1. the op's CUDA tests and the Triton kernels (tests/ops/test_inject_cuda.py, test_inject_triton.py)
#   2. injection forward + backward, B16 L512 D4096, 30 items/sample, bf16: the op vs a torch.where
#      gather vs the original loop vs a plain copy (bench_inject.py)
#   3. one-GPU LoRA training step on a random Llama-2-7B (no weights needed), bf16, gradient
#      checkpointing, sdpa: tokens/s and MFU under ZeRO-2 and ZeRO-3 (bench_gpu_throughput.py)
#   4. score decoding and batched generation on the same model (bench_score.py, bench_generate.py)
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
out=${out:-$(mktemp -d -t gpu-check-XXXX)}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$smoke" = 1 ]; then
  export DS_ACCELERATOR=cpu
  inject=(--smoke); train=(--smoke --config configs/movielens.yaml); decode=(--smoke)
  limit=300
else
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu_check.sh: no CUDA device (use --smoke on a CPU machine)" >&2; exit 2; }
  inject=(--device cuda --dtype bfloat16 --cases big)
  train=(--random-init --preset llama2-7b --config configs/movielens.yaml --length 512 --steps 5 --warmup 2)
  decode=(--preset llama2-7b --dtype bfloat16 --device cuda)
  limit=240
fi

# check NAME LIMIT_S CMD...: run one check, logging to $out/NAME.log; its status goes to $out/NAME.status.
check() {
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" >&2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0))" >"$out/$name.status"
  [ $rc -eq 0 ] || { echo "   $name failed (rc $rc); last lines of $out/$name.log:" >&2; tail -n 15 "$out/$name.log" >&2; }
}

check ops "$limit" "$py" -m pytest -q -p no:cacheprovider tests/ops/test_inject_cuda.py tests/ops/test_inject_triton.py \
  --junitxml "$out/ops.xml"
check inject "$limit" "$py" benchmarks/bench_inject.py "${inject[@]}" --json "$out/inject.json"
for stage in 2 3; do
  check "train_zero$stage" "$limit" "$py" benchmarks/bench_gpu_throughput.py "${train[@]}" --json "$out/train_zero$stage.json" \
    "train.ds_config=ds_configs/zero$stage.json" scaling.num_workers=1
done
check score "$limit" "$py" benchmarks/bench_score.py "${decode[@]}" --json "$out/score.json"
check generate "$limit" "$py" benchmarks/bench_generate.py "${decode[@]}" --json "$out/generate.json"

"$py" - "$out" <<'EOF'
"""One table from the checks' JSON rows, statuses and the ops tests' JUnit counts."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
print(f"\nGPU check on {device}, torch {torch.__version__}\n")
print("| check | setting | result | s |")
print("|---|---|---|---|")
failed = 0
for name in ["ops", "inject", "train_zero2", "train_zero3", "score", "generate"]:
    rc, secs = (out / f"{name}.status").read_text().split()
    rows = []
    if name == "ops" and (out / "ops.xml").exists():
        suite = ET.parse(out / "ops.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        rows.append({"check": "CUDA op tests + Triton kernels", "setting": "fp32/bf16/fp16 vs the torch reference",
                     "result": f"{n - f - e - s} passed, {f + e} failed, {s} skipped"})
    elif (out / f"{name}.json").exists():
        rows = json.loads((out / f"{name}.json").read_text())
    if rc != "0":
        failed += 1
        note = "TIMED OUT" if rc in ("124", "137") else f"FAILED (exit {rc})"
        rows = rows or [{"check": name, "setting": "", "result": ""}]
        rows[-1]["result"] = f"{note}; see {out / (name + '.log')}" + (f" ({rows[-1]['result']})" if rows[-1]["result"] else "")
    for i, r in enumerate(rows):
        print(f"| {r['check']} | {r['setting']} | {r['result']} | {secs if i == 0 else ''} |")
print(f"\nlogs and JSON rows: {out}")
sys.exit(1 if failed else 0)
EOF
