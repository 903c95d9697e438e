"""Benchmark: `inject_embeddings` against the original LLaRA injection loop and a copy floor.

Forward + backward, side by side in one run:
- loop: a faithful re-implementation of the original (per sample, find the placeholder positions
  with `nonzero()`, write the k-th projected item of the sample into the k-th position);
- op: `llara_dist.ops.inject_embeddings` (torch kernel on CPU, Triton kernels on CUDA);
- torch.where gather: what the op computes, in one line of stock PyTorch
  (`torch.where(slots >= 0, rows[slots.clamp(min=0)], inputs_embeds)`), which the op's custom
  kernels must beat to be worth keeping;
- op, frozen inputs / torch.where, frozen inputs: the same two when `inputs_embeds` needs no grad
  (frozen token embeddings, the usual LoRA case): the op's backward then only reads the
  placeholder positions;
- copy floor: a plain out-of-place copy of `inputs_embeds` forward and of its grad backward, the
  least memory traffic any out-of-place injection must pay.

Outputs and gradients of the loop and the op are asserted identical before anything is timed
(torch.where's equal up to the summation order of a repeated row's grads). One table: median wall
and CPU milliseconds per forward + backward, and each method against the loop, against torch.where
(the frozen-inputs rows against torch.where with frozen inputs) and against the copy floor.

    python benchmarks/bench_inject.py                 # big (B=16, L=512, D=4096, 30/sample) + small
    python benchmarks/bench_inject.py --cases small --dtype bfloat16
    python benchmarks/bench_inject.py --device cuda --dtype bfloat16 --cases big --json rows.json
    python benchmarks/bench_inject.py --smoke        # tiny, CPU: checks the script runs
    python benchmarks/bench_inject.py --threads 1 --json rows.json   # also the rows as JSON
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from _timing import write_rows
from torch import Tensor

from llara_dist.ops import inject_embeddings


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    length: int
    dim: int
    per_sample: int


CASES = {
    "big": Case("big", batch=16, length=512, dim=4096, per_sample=30),
    "small": Case("small", batch=4, length=128, dim=512, per_sample=10),
    "smoke": Case("smoke", batch=2, length=32, dim=64, per_sample=4),
}


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """inputs_embeds, per-sample projected items [B, P, D], placeholder mask [B, L], output grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.length, case.dim, generator=gen).to(dtype)
    items = torch.randn(case.batch, case.per_sample, case.dim, generator=gen).to(dtype)
    is_placeholder = torch.zeros(case.batch, case.length, dtype=torch.bool)
    for b in range(case.batch):
        is_placeholder[b, torch.randperm(case.length, generator=gen)[: case.per_sample]] = True
    grad = torch.randn(case.batch, case.length, case.dim, generator=gen).to(dtype)
    return x.to(device), items.to(device), is_placeholder.to(device), grad.to(device)


def original_loop(x: Tensor, items: Tensor, is_placeholder: Tensor) -> Tensor:
    """The original `wrap_emb`: per sample a `nonzero()` (a host sync on GPU), then one indexed
    write per placeholder; autograd records one CopySlices node per write."""
    out = x.clone()
    for i in range(x.shape[0]):
        positions = is_placeholder[i].nonzero().view(-1)
        for idx, item in zip(positions, items[i]):
            out[i, idx] = item
    return out


def with_op(x: Tensor, items: Tensor, is_placeholder: Tensor) -> Tensor:
    """The same through the op: the batch's rows flattened, slots naming each placeholder's row."""
    batch, per_sample, dim = items.shape
    return inject_embeddings(x, _slots(is_placeholder, per_sample), items.reshape(batch * per_sample, dim))


def _slots(is_placeholder: Tensor, per_sample: int) -> Tensor:
    # k-th placeholder of sample b takes row b * P + k (a cumsum, no host sync).
    rank_in_sample = is_placeholder.long().cumsum(dim=1) - 1
    base = torch.arange(is_placeholder.shape[0], device=is_placeholder.device).unsqueeze(1) * per_sample
    return torch.where(is_placeholder, base + rank_in_sample, -1)


def with_where(x: Tensor, items: Tensor, is_placeholder: Tensor) -> Tensor:
    """The op's result in stock PyTorch: gather every position's row, keep it where a slot is set."""
    batch, per_sample, dim = items.shape
    slots = _slots(is_placeholder, per_sample)
    rows = items.reshape(batch * per_sample, dim)[slots.clamp(min=0)]
    return torch.where((slots >= 0).unsqueeze(-1), rows, x)


class _CopyFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone()


def copy_floor(x: Tensor, items: Tensor, is_placeholder: Tensor) -> Tensor:
    return _CopyFloor.apply(x)


def forward_backward(fn: Callable, x: Tensor, items: Tensor, mask: Tensor, grad: Tensor,
                     inputs_grad: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    x = x.detach().requires_grad_(inputs_grad)
    items = items.detach().requires_grad_(fn is not copy_floor)
    out = fn(x, items, mask)
    out.backward(grad)
    return out, x.grad, items.grad


def time_methods(runs: dict[str, Callable[[], object]], repeats: dict[str, int],
                 device: str) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each run, the methods interleaved round-robin so that load from
    other processes hits them alike (`check_identical` has already warmed every method). CPU time
    is this process's, all threads together: on a shared machine it is the steadier figure."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
    for i in range(max(repeats.values())):
        for label, run in runs.items():
            if i >= repeats[label]:
                continue
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            sync()
            times[label].append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3))
    return {label: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for label, ts in times.items()}


def check_identical(case: Case, x, items, mask, grad) -> None:
    out_loop, gx_loop, gi_loop = forward_backward(original_loop, x, items, mask, grad)
    out_op, gx_op, gi_op = forward_backward(with_op, x, items, mask, grad)
    out_w, gx_w, gi_w = forward_backward(with_where, x, items, mask, grad)
    for what, a, b in (("output", out_loop, out_op), ("grad inputs_embeds", gx_loop, gx_op),
                       ("grad items", gi_loop, gi_op)):
        if not torch.equal(a, b):
            raise AssertionError(f"{case.name}: op and loop differ in {what}")
    # index_put's scatter-add may sum a repeated row's grads in another order: equal to rounding.
    tol = dict(rtol=0, atol=0) if gi_op.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for what, a, b in (("output", out_op, out_w), ("grad inputs_embeds", gx_op, gx_w)):
        if not torch.equal(a, b):
            raise AssertionError(f"{case.name}: op and torch.where differ in {what}")
    torch.testing.assert_close(gi_w, gi_op, **tol, msg=f"{case.name}: op and torch.where differ in grad items")
    _, _, gi_frozen = forward_backward(with_op, x, items, mask, grad, inputs_grad=False)
    if not torch.equal(gi_frozen, gi_loop):
        raise AssertionError(f"{case.name}: frozen-inputs op differs in grad items")
    _, _, gi_w_frozen = forward_backward(with_where, x, items, mask, grad, inputs_grad=False)
    torch.testing.assert_close(gi_w_frozen, gi_op, **tol, msg=f"{case.name}: frozen-inputs torch.where differs")
    forward_backward(copy_floor, x, items, mask, grad)  # warm-up of the last method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="big,small", help="comma-separated: big, small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the fast methods")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed runs of the loop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--smoke", action="store_true", help="the smoke case on CPU, few repeats: checks the script runs")
    parser.add_argument("--json", help="also write the table's rows as JSON here (gpu_check.sh)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.device, args.repeats = "smoke", "cpu", 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    kernel = "torch"
    if args.device == "cuda":
        from llara_dist.ops.inject import _triton_kernels
        kernel = "triton" if _triton_kernels() is not None else "torch (dense)"
    print(f"device={args.device} kernel={kernel} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    json_rows: list[dict] = []
    header = (f"{'case':<6} {'shape (B,L,D,P)':<18} {'method':<28} {'wall ms':>10} {'CPU ms':>10} "
              f"{'vs loop':>9} {'vs where':>9} {'vs copy':>8}")
    print(header)
    print("-" * len(header))
    for name in args.cases.split(","):
        case = CASES[name.strip()]
        x, items, mask, grad = make_inputs(case, dtype, args.device)
        check_identical(case, x, items, mask, grad)
        # (label, function, inputs_embeds needs grad, timed runs, the torch.where row it is compared with)
        methods = [
            ("loop (original)", original_loop, True, args.loop_repeats, "torch.where gather"),
            ("op", with_op, True, args.repeats, "torch.where gather"),
            ("torch.where gather", with_where, True, args.repeats, "torch.where gather"),
            ("op, frozen inputs", with_op, False, args.repeats, "torch.where, frozen inputs"),
            ("torch.where, frozen inputs", with_where, False, args.repeats, "torch.where, frozen inputs"),
            ("copy floor", copy_floor, True, args.repeats, "torch.where gather"),
        ]
        runs = {label: (lambda fn=fn, ig=inputs_grad: forward_backward(fn, x, items, mask, grad, ig))
                for label, fn, inputs_grad, _, _ in methods}
        results = time_methods(runs, {label: repeats for label, _, _, repeats, _ in methods}, args.device)
        shape = f"{case.batch},{case.length},{case.dim},{case.per_sample}"
        setting = f"B{case.batch} L{case.length} D{case.dim}, {case.per_sample} items/sample, {args.dtype}, {args.device}"
        loop_ms, copy_ms = results["loop (original)"][0], results["copy floor"][0]
        for label, _, _, _, where_label in methods:
            ms, cpu_ms = results[label]
            vs_where = ms / results[where_label][0]
            print(f"{case.name:<6} {shape:<18} {label:<28} {ms:>10.2f} {cpu_ms:>10.2f} "
                  f"{loop_ms / ms:>8.1f}x {vs_where:>8.2f}x {ms / copy_ms:>7.2f}x")
            json_rows.append({"check": "injection fwd+bwd", "setting": f"{label}: {setting}",
                              "result": f"{ms:.2f} ms (CPU {cpu_ms:.2f}); {loop_ms / ms:.1f}x faster than the loop, "
                                        f"{vs_where:.2f}x the time of {where_label}, {ms / copy_ms:.2f}x of a copy",
                              "ms": ms, "cpu_ms": cpu_ms, "method": label, "case": case.name,
                              "vs_loop": loop_ms / ms, "vs_where": vs_where, "vs_copy": ms / copy_ms})
        del x, items, mask, grad
    print("vs loop: how many times faster than the loop; vs where / vs copy: time as a multiple of torch.where's "
          "(frozen rows: of torch.where with frozen inputs) / of the copy floor's")
    print("outputs and gradients of op and loop: identical (asserted); torch.where: equal up to rounding of "
          "repeated rows' summed grads")
    if args.json:
        write_rows(args.json, json_rows)


if __name__ == "__main__":
    main()
