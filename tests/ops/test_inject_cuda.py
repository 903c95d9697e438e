"""The op on a CUDA device (Triton kernels when triton is importable): runs only where a GPU is.

CI has no GPU; there the kernels' logic is covered by `test_inject_triton.py` under the Triton
interpreter. On a GPU machine this file checks the compiled kernels themselves.
"""

from __future__ import annotations

import pytest
import torch

from llara_dist.ops import inject_embeddings
from llara_dist.ops.inject import backward_torch, forward_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(dtype, batch=8, length=64, dim=1031, n_rows=12, per_sample=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=gen).to(dtype)
    rows = torch.randn(n_rows, dim, generator=gen).to(dtype)
    grad = torch.randn(batch, length, dim, generator=gen).to(dtype)
    slots = torch.full((batch, length), -1, dtype=torch.int64)
    for b in range(batch):
        slots[b, torch.randperm(length, generator=gen)[:per_sample]] = torch.randint(
            0, n_rows, (per_sample,), generator=gen)  # items repeat across the batch
    return x, slots, rows, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_kernel(dtype):
    x, slots, rows, grad = make_case(dtype)
    want_out = forward_torch(x, slots, rows)
    want_inputs, want_rows = backward_torch(grad, slots, rows.shape[0], True)
    xc = x.cuda().requires_grad_(True)
    rc = rows.cuda().requires_grad_(True)
    out = inject_embeddings(xc, slots.cuda(), rc)
    out.backward(grad.cuda())
    assert torch.equal(out.cpu(), want_out)
    assert torch.equal(xc.grad.cpu(), want_inputs)
    # float32 sums in the same order; only the final rounding to bf16/fp16 may differ by an ulp.
    torch.testing.assert_close(rc.grad.cpu(), want_rows)
    if dtype == torch.float32:
        assert torch.equal(rc.grad.cpu(), want_rows)


def test_cuda_rows_grad_is_deterministic():
    x, slots, rows, grad = make_case(torch.bfloat16)
    slots, grad = slots.cuda(), grad.cuda()
    grads = []
    for _ in range(2):
        rc = rows.cuda().requires_grad_(True)
        inject_embeddings(x.cuda(), slots, rc).backward(grad)
        grads.append(rc.grad)
    assert torch.equal(grads[0], grads[1])


def test_cuda_torch_compile_fullgraph():
    x, slots, rows, _ = make_case(torch.float32, dim=256)
    torch._dynamo.reset()
    compiled = torch.compile(inject_embeddings, fullgraph=True)
    out = compiled(x.cuda(), slots.cuda(), rows.cuda())
    assert torch.equal(out.cpu(), forward_torch(x, slots, rows))
