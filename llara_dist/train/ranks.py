"""Rank-0-only sections that every rank leaves alike.

Some work is done by rank 0 alone (deciding which checkpoint to resume, converting it) while the
other ranks wait for the result in a collective. If rank 0 raised and the others kept waiting,
they would hang until the collective timed out. :func:`on_rank0` catches *any* exception on rank
0 and broadcasts it with the result, so every rank returns the same value or raises the same error.
"""

from __future__ import annotations

import pickle
from typing import Callable, TypeVar

T = TypeVar("T")


def on_rank0(fn: Callable[[], T], *, rank: int) -> T:
    """``fn()`` run on rank 0 only; every rank returns its result or raises its exception.

    Collective when a process group of more than one rank exists: every rank must call it.
    """
    import torch.distributed as dist

    box: list = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 (forwarded to every rank, then re-raised)
            error = e
            box[0] = ("error", _picklable(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if error is not None:  # rank 0 keeps its own traceback
            raise error
        raise value
    return value


def _picklable(e: Exception) -> Exception:
    """``e`` itself if it survives pickling (the usual case), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0 raised {type(e).__name__}: {e}")
