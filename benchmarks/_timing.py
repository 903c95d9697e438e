"""Wall-clock timing and result rows shared by the benchmark scripts (imported from the scripts' own directory)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[[], T], device: str, repeats: int = 1) -> tuple[T, float]:
    """``fn()``'s last result and its best wall time over ``repeats`` calls, in seconds.

    On CUDA the device is synchronised before and after each call: kernels run asynchronously, so
    the host clock alone would time only their launch.
    """
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def write_rows(path: str, rows: list[dict]) -> None:
    """Result rows for `gpu_check.sh`'s table: each has ``check``, ``setting`` and ``result`` (text)
    plus the raw numbers."""
    import json

    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
