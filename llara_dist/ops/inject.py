"""`inject_embeddings`: write projected item rows into the placeholder positions of a batch.

LLaRA replaces the embedding of every `[HistoryEmb]`/`[CansEmb]` token with the projected
recommender embedding of the item it stands for. The original did this with a Python loop per
sample and per position (plus a `nonzero()` host sync per sample); here it is one registered
PyTorch custom op, so it is a single node for autograd and for `torch.compile`:

    out[b, l] = rows[slots[b, l]]   if slots[b, l] >= 0
    out[b, l] = inputs_embeds[b, l] otherwise (slots[b, l] == -1)

Backward: grad_inputs_embeds is the output grad with the injected positions zeroed, and
grad_rows[k] is the sum of the output grads at the positions that took row k (accumulated in
float32, then cast to the rows' dtype).

Kernels:
- CPU: the sparse PyTorch kernel below. It finds the placeholder positions once per batch
  (`nonzero` on a CPU tensor is not a device sync), so it touches the full [B, L, D] tensor only in
  the unavoidable out-of-place copy.
- CUDA with triton importable: the Triton kernels in `inject_triton.py` (no host sync).
- Any other device (or CUDA without triton): the dense PyTorch kernel, also free of host syncs.

Slot validation: on CPU the whole `slots` tensor is range-checked with one reduction and a bad
slot raises `DataError` naming the first bad position. On other devices the same condition is
checked with `torch._assert_async` (no host sync): a bad slot fails as a device-side assertion,
like an out-of-range `nn.Embedding` index; the kernels never read outside `rows` either way.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from llara_dist.errors import DataError

__all__ = ["inject_embeddings"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_slots(slots: Tensor, n_rows: int) -> None:
    """Every slot must be -1 (keep) or a row index in [0, n_rows)."""
    if slots.numel() == 0:
        return
    if slots.device.type != "cpu":
        # Sync-free: a failure surfaces as a device-side assertion at the next sync.
        ok = (slots >= -1).all() & (slots < n_rows).all()
        torch._assert_async(ok, "inject_embeddings: slots must be -1 or in [0, n_rows)")
        return
    lo, hi = torch.aminmax(slots)  # one pass over the whole tensor, not one check per sample
    if lo.item() >= -1 and hi.item() < n_rows:
        return
    bad = ((slots < -1) | (slots >= n_rows)).nonzero()[0].tolist()
    raise DataError(
        f"inject_embeddings: slots{tuple(bad)} = {int(slots[tuple(bad)])} is out of range; "
        f"expected -1 (keep) or a row index in [0, {n_rows}) for rows of shape [{n_rows}, D]"
    )


# --------------------------------------------------------------------------------------------
# PyTorch kernels
# --------------------------------------------------------------------------------------------

def _placeholder_positions(slots: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the placeholder positions and the row each one takes."""
    flat = slots.reshape(-1)
    pos = (flat >= 0).nonzero().squeeze(1)
    return pos, flat.index_select(0, pos)


def _sparse_default(t: Tensor) -> bool:
    # `nonzero` needs its result size on the host: free on CPU, a device sync anywhere else.
    return t.device.type == "cpu"


def forward_torch(
    inputs_embeds: Tensor, slots: Tensor, rows: Tensor, *, sparse: bool | None = None
) -> Tensor:
    """PyTorch kernel for any device: sparse (CPU default) or sync-free dense (elsewhere)."""
    _check_slots(slots, rows.shape[0])
    dim = inputs_embeds.shape[-1]
    if _sparse_default(inputs_embeds) if sparse is None else sparse:
        out = inputs_embeds.clone(memory_format=torch.contiguous_format)
        pos, take = _placeholder_positions(slots)
        out.view(-1, dim).index_copy_(0, pos, rows.index_select(0, take))
        return out
    if rows.shape[0] == 0:  # validated above: every slot is -1
        return inputs_embeds.clone(memory_format=torch.contiguous_format)
    keep = (slots < 0).unsqueeze(-1)
    return torch.where(keep, inputs_embeds, rows[slots.clamp(min=0)])


def backward_torch(
    grad_out: Tensor, slots: Tensor, n_rows: int, need_grad_inputs: bool,
    *, sparse: bool | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(grad_inputs_embeds or None, grad_rows) for the output grad `grad_out`."""
    dim = grad_out.shape[-1]
    grad_flat = grad_out.reshape(-1, dim)
    grad_rows = grad_out.new_zeros((n_rows, dim), dtype=torch.float32)
    grad_inputs = None
    if _sparse_default(grad_out) if sparse is None else sparse:
        pos, take = _placeholder_positions(slots)
        grad_rows.index_add_(0, take, grad_flat.index_select(0, pos).float())
        if need_grad_inputs:
            grad_inputs = grad_out.clone(memory_format=torch.contiguous_format)
            grad_inputs.view(-1, dim).index_fill_(0, pos, 0)
    else:
        inject = slots >= 0
        # Non-placeholder positions accumulate into a spare row n_rows that is dropped; on CUDA
        # `index_put_(accumulate=True)` sorts the indices, so this is deterministic.
        target = torch.where(inject, slots, n_rows).reshape(-1)
        spare = grad_out.new_zeros((n_rows + 1, dim), dtype=torch.float32)
        spare.index_put_((target,), grad_flat.float(), accumulate=True)
        grad_rows = spare[:n_rows]
        if need_grad_inputs:
            grad_inputs = grad_out.masked_fill(inject.unsqueeze(-1), 0)
    return grad_inputs, grad_rows.to(grad_out.dtype)


# --------------------------------------------------------------------------------------------
# Kernel choice
# --------------------------------------------------------------------------------------------

@functools.cache
def _triton_kernels() -> ModuleType | None:
    """`inject_triton` if triton is importable, else None (then CUDA uses the torch kernel)."""
    try:
        from llara_dist.ops import inject_triton
    except ImportError:
        return None
    return inject_triton


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and _triton_kernels() is not None


# --------------------------------------------------------------------------------------------
# Custom ops: forward, backward (with and without grad_inputs_embeds), fakes, autograd
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("llara::inject_embeddings", mutates_args=())
def _inject_op(inputs_embeds: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    if _use_triton(inputs_embeds):
        _check_slots(slots, rows.shape[0])
        return _triton_kernels().forward(inputs_embeds, slots, rows)
    return forward_torch(inputs_embeds, slots, rows)


@_inject_op.register_fake
def _inject_fake(inputs_embeds: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    return torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format)


@torch.library.custom_op("llara::inject_embeddings_backward", mutates_args=())
def _backward_op(grad_out: Tensor, slots: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    if _use_triton(grad_out):
        return _triton_kernels().backward(grad_out, slots, n_rows, need_grad_inputs=True)
    return backward_torch(grad_out, slots, n_rows, need_grad_inputs=True)


@_backward_op.register_fake
def _backward_fake(grad_out: Tensor, slots: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    grad_inputs = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    return grad_inputs, grad_out.new_empty((n_rows, grad_out.shape[-1]))


# The common training case: inputs_embeds come from the frozen token embedding and need no grad,
# so the backward reads only the placeholder positions of the output grad.
@torch.library.custom_op("llara::inject_embeddings_rows_grad", mutates_args=())
def _rows_grad_op(grad_out: Tensor, slots: Tensor, n_rows: int) -> Tensor:
    if _use_triton(grad_out):
        return _triton_kernels().backward(grad_out, slots, n_rows, need_grad_inputs=False)[1]
    return backward_torch(grad_out, slots, n_rows, need_grad_inputs=False)[1]


@_rows_grad_op.register_fake
def _rows_grad_fake(grad_out: Tensor, slots: Tensor, n_rows: int) -> Tensor:
    return grad_out.new_empty((n_rows, grad_out.shape[-1]))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    _, slots, rows = inputs
    ctx.save_for_backward(slots)
    ctx.n_rows = rows.shape[0]


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
    (slots,) = ctx.saved_tensors
    need_inputs, _, need_rows = ctx.needs_input_grad
    grad_out = grad_out.contiguous()
    if need_inputs:
        grad_inputs, grad_rows = _backward_op(grad_out, slots, ctx.n_rows)
        return grad_inputs, None, grad_rows if need_rows else None
    if need_rows:
        return None, None, _rows_grad_op(grad_out, slots, ctx.n_rows)
    return None, None, None


_inject_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------

def _check_inputs(batch: int, length: int, dim: int, dtype: torch.dtype, device: torch.device,
                  slots: Tensor, rows: Tensor) -> None:
    if slots.shape != (batch, length):
        raise ValueError(
            f"inject_embeddings: slots must be [B, L] = [{batch}, {length}] like the tokens, "
            f"got shape {tuple(slots.shape)}"
        )
    if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise ValueError(f"inject_embeddings: slots must be an integer tensor, got {slots.dtype}")
    if rows.dim() != 2 or rows.shape[1] != dim:
        raise ValueError(
            f"inject_embeddings: rows must be [N, D] with D = {dim} (the embedding width), "
            f"got shape {tuple(rows.shape)}"
        )
    if rows.dtype != dtype:
        raise ValueError(
            f"inject_embeddings: rows dtype {rows.dtype} differs from the embeddings' dtype "
            f"{dtype}; cast the projected rows first"
        )
    if rows.device != device or slots.device != device:
        raise ValueError(
            f"inject_embeddings: embeddings ({device}), slots ({slots.device}) and rows "
            f"({rows.device}) must be on the same device"
        )


def inject_embeddings(inputs_embeds: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    """Return a copy of `inputs_embeds` [B, L, D] with `rows[slots[b, l]]` at every position
    whose slot is >= 0 (slot -1 keeps the original embedding).

    `slots` is [B, L] of integers, `rows` is [N, D] in the dtype of `inputs_embeds`. The result is
    differentiable w.r.t. `inputs_embeds` and `rows`; grad_rows[k] sums the output grads of the
    positions that took row k.
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(
            f"inject_embeddings: inputs_embeds must be [B, L, D], got shape {tuple(inputs_embeds.shape)}"
        )
    batch, length, dim = inputs_embeds.shape
    _check_inputs(batch, length, dim, inputs_embeds.dtype, inputs_embeds.device, slots, rows)
    return _inject_op(inputs_embeds.contiguous(), slots.to(torch.int64).contiguous(), rows.contiguous())
