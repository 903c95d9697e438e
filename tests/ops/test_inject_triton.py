"""The CUDA Triton kernels, run on CPU under `TRITON_INTERPRET=1`, against the PyTorch kernel.

Triton decides at decoration time whether `@triton.jit` compiles or interprets, so the checks run
in a fresh interpreter with the variable set (this file executed as a script); setting it in this
process would change triton for every other test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [
    # name, dtype, B, L, D, N, placeholders per sample
    ("fp32", "float32", 3, 10, 16, 4, 5),
    ("bf16", "bfloat16", 3, 10, 16, 4, 5),
    ("odd D", "float32", 2, 7, 13, 3, 3),
    ("odd D over several blocks", "bfloat16", 2, 3, 1029, 2, 2),
    ("repeated rows", "float32", 4, 9, 8, 1, 6),
    ("no placeholders, N=0", "float32", 2, 6, 8, 0, 0),
    ("no placeholders, N>0", "bfloat16", 2, 6, 8, 3, 0),
]


def run_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    import torch

    from llara_dist.ops import inject_triton
    from llara_dist.ops.inject import backward_torch, forward_torch

    for name, dtype_name, batch, length, dim, n_rows, per_sample in CASES:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(len(name))
        x = torch.randn(batch, length, dim, generator=gen).to(dtype)
        rows = torch.randn(n_rows, dim, generator=gen).to(dtype)
        grad = torch.randn(batch, length, dim, generator=gen).to(dtype)
        slots = torch.full((batch, length), -1, dtype=torch.int64)
        for b in range(batch if per_sample else 0):
            pos = torch.randperm(length, generator=gen)[:per_sample]
            slots[b, pos] = torch.randint(0, n_rows, (per_sample,), generator=gen)

        out = inject_triton.forward(x, slots, rows)
        assert torch.equal(out, forward_torch(x, slots, rows)), f"{name}: forward differs"
        for need_inputs in (True, False):
            got_inputs, got_rows = inject_triton.backward(grad, slots, n_rows, need_inputs)
            want_inputs, want_rows = backward_torch(grad, slots, n_rows, need_inputs)
            assert got_rows.dtype == dtype and got_rows.shape == (n_rows, dim), name
            # Same float32 sums in the same (ascending position) order: bitwise equal in fp32.
            # The interpreter rounds float32 -> bfloat16 toward zero where CUDA rounds to
            # nearest even, so in bf16 compare with the float32 sums truncated the same way.
            if dtype == torch.float32:
                assert torch.equal(got_rows, want_rows), f"{name}: grad_rows differ"
            else:
                sums = backward_torch(grad.float(), slots, n_rows, False)[1]
                truncated = (sums.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
                assert torch.equal(got_rows, truncated), f"{name}: grad_rows differ"
                torch.testing.assert_close(got_rows, want_rows, rtol=2 ** -7, atol=0)
            if need_inputs:
                assert torch.equal(got_inputs, want_inputs), f"{name}: grad_inputs differ"
            else:
                assert got_inputs is None, name
        print(f"ok  {name}")

    # Out-of-range slots (the CUDA path's assertion aside) are kept, never read out of bounds.
    x = torch.randn(1, 4, 8)
    rows = torch.randn(2, 8)
    slots = torch.tensor([[0, 2, -5, 1]])
    out = inject_triton.forward(x, slots, rows)
    assert torch.equal(out[0, 1:3], x[0, 1:3]) and torch.equal(out[0, 3], rows[1])
    _, got_rows = inject_triton.backward(torch.ones(1, 4, 8), slots, 2, True)
    assert torch.equal(got_rows, torch.ones(2, 8))
    print("ok  out-of-range slots kept")

    # The custom op's CUDA wiring (forward, both backward ops) with the triton kernels chosen.
    from llara_dist.ops import inject, inject_embeddings

    inject._use_triton = lambda t: True
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([[2, -1, 0, 2], [-1, 1, 2, -1]])
    for inputs_need_grad in (True, False):
        x = torch.randn(2, 4, 6, generator=gen).requires_grad_(inputs_need_grad)
        rows = torch.randn(3, 6, generator=gen, requires_grad=True)
        grad = torch.randn(2, 4, 6, generator=gen)
        out = inject_embeddings(x, slots, rows)
        out.backward(grad)
        inject_ = slots >= 0
        assert torch.equal(out[inject_], rows.detach()[slots[inject_]])
        assert torch.equal(out[~inject_], x.detach()[~inject_])
        want_rows = torch.zeros(3, 6).index_add_(0, slots[inject_], grad[inject_])
        assert torch.equal(rows.grad, want_rows)
        if inputs_need_grad:
            assert torch.equal(x.grad, grad.masked_fill(inject_.unsqueeze(-1), 0))
    print("ok  custom ops through the triton kernels")


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") == len(CASES) + 2, result.stdout


if __name__ == "__main__":
    run_checks()
