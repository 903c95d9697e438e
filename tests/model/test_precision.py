"""Precision under a real DeepSpeed engine: ZeRO-2 and ZeRO-3, with and without `model.zero_init`,
from a bf16 checkpoint saved like a real one (see precision_worker.py).

The contract (docs/model.md): the trainable weights (LoRA + projector) in the base's half dtype,
one dtype as DeepSpeed requires (ZeRO-3 + zero_init asserted on PEFT's fp32 LoRA next to a bf16
projector), an fp32 master copy in the optimizer, and the export read from that master copy.
fp16 needs an accelerator that has it: DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is
not supported on your device"), so the fp16 cases run only where CUDA is present.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("precision_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conformance.families import make_checkpoint

    tmp = tmp_path_factory.mktemp("precision")
    ckpt = make_checkpoint("llama3", [f"Movie {i} the great adventure" for i in range(12)], tmp / "ckpt")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(ckpt), str(out), str(_free_port())], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {(r["stage"], r["dtype"], r["zero_init"]): r for r in json.loads(out.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("zero_init", [False, True])
@pytest.mark.parametrize("stage", [2, 3])
def test_one_trainable_dtype_fp32_master_and_export_from_master(results, stage, zero_init, dtype):
    import torch

    r = results[(stage, dtype, zero_init)]
    if dtype == "float16" and not torch.cuda.is_available():
        assert "fp16 is not supported on your device" in r.get("error", ""), r  # the only expected failure
        pytest.skip("DeepSpeed's CPU accelerator has no fp16; this case runs on CUDA")
    assert "error" not in r, r["error"]
    half = f"torch.{dtype}"
    assert r["trainable_dtypes_before"] == [half], r  # one dtype: what DeepSpeed requires
    assert r["trainable_dtypes_engine"] == [half], r
    assert r["master_dtype"] == "torch.float32" and r["master_moved"], r
    # The adapter on disk is the optimizer's fp32 master copy, not the rounded half copy.
    assert r["export_dtype"] == "torch.float32" and r["export_equals_master"], r
