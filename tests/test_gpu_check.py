"""The GPU validation kit (`benchmarks/gpu_check.sh`) at tiny sizes on the CPU, so it cannot rot
between the sessions that have a GPU: every check must run through and land in the one table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_prints_one_table_with_every_check(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    checks = [row.split("|")[1].strip() for row in table]
    # injection: loop, op, torch.where, op and torch.where with frozen inputs, copy floor
    assert checks == ["CUDA op tests + Triton kernels", *["injection fwd+bwd"] * 6, "training step (LoRA)",
                      "training step (LoRA)", "score decoding", "batched generation"], proc.stdout
    assert "torch.where" in table[3] and "the time of torch.where" in table[2]
    assert "zero2.json" in table[7] and "zero3.json" in table[8]
    assert "tokens/s" in table[7] and "MFU" in table[7]
    assert not any("FAILED" in row or "TIMED OUT" in row for row in table)
    # The Triton kernels ran under the interpreter (the CUDA-only tests skip on a CPU machine).
    assert " 0 failed" in table[0] and not table[0].split("|")[3].strip().startswith("0 passed")
