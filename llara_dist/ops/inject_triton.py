"""Triton kernels of `inject_embeddings` for CUDA (imported lazily by `inject.py`).

Forward: one program per (position, block of D) copies either the position's embedding or the
row its slot names; every element of the output is read once and written once.

Backward: one launch makes both gradients in a single pass over the output grad. The programs
for positions write grad_inputs_embeds (the grad, zeroed at placeholders, whose grad they do not
read); the programs for rows each sum the grads of the positions that took their row.

How rows' grads accumulate: sort/segment, not atomics. The placeholder positions are sorted by
row (a stable `argsort` of B*L integers, on the device, no host sync) and segment starts come
from a scatter-add count and a cumsum; each row's program then adds its segment in float32 in
ascending position order and stores the result once. Compared with `atomic_add` this needs no
zero-filled float32 buffer and no cast pass for bf16/fp16 rows, has no contention when an item
repeats across the batch, and is deterministic: repeated runs and resumed runs give bitwise
identical grads, in the same summation order as the CPU kernel.

Out-of-range slots: `inject.py` checks them with `torch._assert_async` (a device-side assertion,
no host sync); independently, the kernels treat a slot outside [0, N) as "keep" and never read
or write outside `rows`.

On CPU these kernels run under `TRITON_INTERPRET=1` (set before triton is imported), which is
how CI checks them against the PyTorch kernel.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it the tensors' device (CPU tensors under
    # the interpreter need no guard).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(dim: int) -> int:
    # A block covers a whole row for D <= 1024; wider rows are split over grid axis 1.
    return min(triton.next_power_of_2(max(dim, 16)), 1024)


@triton.jit
def _forward_kernel(src_ptr, slots_ptr, rows_ptr, out_ptr, n_rows, dim, BLOCK_D: tl.constexpr):
    # src is inputs_embeds [B*L, D]; position p keeps src[p] unless its slot names a row.
    pos = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_dim = offs < dim
    # The slot broadcast to the block: masks built from a scalar bool break the interpreter.
    slot = tl.load(slots_ptr + pos) + tl.zeros([BLOCK_D], dtype=tl.int64)
    inject = (slot >= 0) & (slot < n_rows)
    keep = (slot < 0) | (slot >= n_rows)
    from_rows = tl.load(rows_ptr + slot * dim + offs, mask=in_dim & inject, other=0.0)
    from_src = tl.load(src_ptr + pos * dim + offs, mask=in_dim & keep, other=0.0)
    tl.store(out_ptr + pos * dim + offs, tl.where(inject, from_rows, from_src), mask=in_dim)


@triton.jit
def _backward_kernel(grad_ptr, slots_ptr, order_ptr, seg_start_ptr, grad_inputs_ptr,
                     grad_rows_ptr, n_pos_programs, n_rows, dim, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_dim = offs < dim
    if pid < n_pos_programs:
        # grad_inputs_embeds: the output grad, zero where a row was injected.
        pos = pid.to(tl.int64)
        slot = tl.load(slots_ptr + pos) + tl.zeros([BLOCK_D], dtype=tl.int64)
        keep = (slot < 0) | (slot >= n_rows)
        g = tl.load(grad_ptr + pos * dim + offs, mask=in_dim & keep, other=0.0)
        tl.store(grad_inputs_ptr + pos * dim + offs, g, mask=in_dim)
    else:
        # grad_rows[row]: sum over the row's segment of the position order.
        row = (pid - n_pos_programs).to(tl.int64)
        start = tl.load(seg_start_ptr + row)
        end = tl.load(seg_start_ptr + row + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(start, end):
            pos = tl.load(order_ptr + j)
            acc += tl.load(grad_ptr + pos * dim + offs, mask=in_dim, other=0.0).to(tl.float32)
        tl.store(grad_rows_ptr + row * dim + offs,
                 acc.to(grad_rows_ptr.dtype.element_ty), mask=in_dim)


def forward(inputs_embeds: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    """out[b, l] = rows[slots[b, l]] where the slot is in range, else inputs_embeds[b, l]."""
    dim = inputs_embeds.shape[-1]
    out = torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format)
    n_pos = slots.numel()
    if n_pos == 0 or dim == 0:
        return out
    block = _block_d(dim)
    grid = (n_pos, triton.cdiv(dim, block))
    with _on_device(out):
        _forward_kernel[grid](inputs_embeds, slots, rows, out, rows.shape[0], dim, BLOCK_D=block)
    return out


def row_segments(slots: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """(order, seg_start): flat positions sorted by row (stable) and where each row's run starts.

    Positions that keep their embedding (or carry an out-of-range slot) sort after every row and
    belong to no segment. Device-only work: no host sync.
    """
    flat = slots.reshape(-1)
    valid = (flat >= 0) & (flat < n_rows)
    key = torch.where(valid, flat, n_rows)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_rows + 1, dtype=torch.int64, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    seg_start = torch.zeros(n_rows + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts[:n_rows], dim=0, out=seg_start[1:])
    return order, seg_start


def backward(
    grad_out: Tensor, slots: Tensor, n_rows: int, need_grad_inputs: bool
) -> tuple[Tensor | None, Tensor]:
    """(grad_inputs_embeds or None, grad_rows) in one launch over the output grad."""
    dim = grad_out.shape[-1]
    grad_rows = grad_out.new_empty((n_rows, dim))
    grad_inputs = (torch.empty_like(grad_out, memory_format=torch.contiguous_format)
                   if need_grad_inputs else None)
    n_pos_programs = slots.numel() if need_grad_inputs else 0
    if n_pos_programs + n_rows == 0 or dim == 0:
        return grad_inputs, grad_rows
    order, seg_start = row_segments(slots, n_rows)
    block = _block_d(dim)
    grid = (n_pos_programs + n_rows, triton.cdiv(dim, block))
    with _on_device(grad_out):
        _backward_kernel[grid](
            grad_out, slots, order, seg_start,
            grad_inputs if need_grad_inputs else grad_rows,  # unused pointer when not needed
            grad_rows, n_pos_programs, n_rows, dim, BLOCK_D=block,
        )
    return grad_inputs, grad_rows
