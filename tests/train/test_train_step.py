"""One optimiser step's contract, on real DeepSpeed engines in plain gloo process groups (no Ray):

* the loss is normalised by the answer tokens of the whole global batch: 1x4, 2x2 and 4x1
  (workers x accumulation) give the same gradient;
* a text step leaves the projector's weights and Adam state exactly unchanged (ZeRO-2 and ZeRO-3),
  and a run resumed from a checkpoint continues exactly;
* an exception in a rank-0-only section reaches every rank (no hang).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _launch(case: str, world: int, out: Path, shards, rec, timeout: float = 600, **env) -> None:
    """Run ``dist_cases.case_<case>`` on ``world`` ranks; fail (not hang) if any rank outlives ``timeout``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **env}
    procs = [subprocess.Popen([sys.executable, str(HERE / "dist_cases.py"), case, str(out), str(shards), str(rec)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{case}: a rank was still running after {timeout} s (hung collective?)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def test_rank0_error_reaches_every_rank(tiny_shards, tiny_rec, tmp_path):
    """Rank 0 alone walks the checkpoint storage; its OSError must end rank 1 too, at once."""
    _launch("rank0_error", 2, tmp_path, tiny_shards, tiny_rec, timeout=240)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"error": "OSError", "message": "injected: storage unreachable"}, (rank, got)


def test_loss_is_normalised_by_the_global_batch(tiny_shards, tiny_rec, tmp_path):
    """The same 8 samples as workers x accumulation x micro-batch 1x4x2, 2x2x2, 4x1x2 and 1x1x8: one
    gradient. (A per-micro-batch mean would agree among the first three, all micro-batches of 2,
    but not with the single batch of 8, whose answers it would weigh by token instead of by batch.)"""
    import torch

    for world, size in ((1, 2), (2, 2), (4, 2), (1, 8)):
        _launch("grad", world, tmp_path, tiny_shards, tiny_rec, CASE_MICRO=str(size))
    runs = {k: torch.load(tmp_path / f"grad_{k}.pt") for k in ("1x4x2", "2x2x2", "4x1x2", "1x1x8")}
    counts = runs["1x4x2"]["counts"]
    assert len(set(counts)) > 1 and sum(counts) == runs["1x1x8"]["counts"][0], counts  # answers differ in length
    ref = runs["1x1x8"]
    assert any(g.abs().max() > 1e-4 for g in ref["grad"].values())
    assert any("projector" in k and g.abs().max() > 0 for k, g in ref["grad"].items())
    for key in ("1x4x2", "2x2x2", "4x1x2"):
        assert runs[key]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for name, g in ref["grad"].items():
            torch.testing.assert_close(runs[key]["grad"][name], g, rtol=1e-4, atol=1e-7, msg=f"{key}: {name}")


@pytest.mark.parametrize("stage", ["2", "3"])
def test_text_step_leaves_the_projector_exactly_unchanged(tiny_shards, tiny_rec, tmp_path, stage):
    import torch

    _launch("text_step", 1, tmp_path, tiny_shards, tiny_rec, CASE_ZERO=stage)
    got = torch.load(tmp_path / "text_step.pt")
    snaps = got["snaps"]  # before step 1, then after each of: hybrid, text, text, hybrid, text
    keys = ("module", "master", "exp_avg", "exp_avg_sq", "step")

    def same(a, b):
        return all(torch.equal(a[k], b[k]) if k != "step" else a[k] == b[k] for k in keys)

    assert snaps[0]["projector"]["module"].numel() > 0 and snaps[0]["lora"]["module"].numel() > 0
    for i, (before, after) in enumerate(zip(snaps, snaps[1:])):
        text = i in (1, 2, 4)
        # Text steps: projector weights, fp32 master, both moments and step count bit-identical.
        assert same(before["projector"], after["projector"]) == text, i
        assert before["lora"]["step"] != after["lora"]["step"], i  # LoRA trains on every step
        if i > 0:  # (the first step runs at the warm-up's starting learning rate, 0)
            assert not torch.equal(before["lora"]["module"], after["lora"]["module"]), i
    # Adam's step count: the projector's counts the hybrid steps (2), LoRA's every step (5).
    assert (snaps[-1]["lora"]["step"], snaps[-1]["projector"]["step"]) == ([5.0], [2.0])
    # The control: the same text step without the freeze moves the projector (Adam's momentum).
    assert not torch.equal(got["before_unfrozen"]["projector"]["module"], got["unfrozen"]["projector"]["module"])
    # Exact resume: the run continued from the step-2 checkpoint reproduces steps 3-5 bit for bit.
    assert got["resumed"] == got["losses"][2:]
    for a, b in zip(got["resumed_snaps"], snaps[3:]):
        assert same(a["lora"], b["lora"]) and same(a["projector"], b["projector"])
