"""Periodic validation inside the training workers, on the ZeRO-3-wrapped model.

Under ZeRO-3 every forward gathers parameters with collectives, so all ranks must make exactly
the same number of forward calls or the job hangs. Two rules guarantee it:

1. every rank gets the same number of samples: its strided part of the fixed subset, padded with
   dummy copies of the first sample (decoded, then dropped) up to ``ceil(n / world_size)``, hence
   the same number of batches;
2. greedy decoding asks all ranks after each step whether they are done (an all-reduce) and keeps
   stepping, feeding padding to finished rows, until every rank is.

Counts are summed over ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch

from llara_dist.eval.evaluate import EvalSettings, evaluate_samples


def validation_subset(shard_dir: str | Path, n: int) -> list[dict]:
    """The fixed validation subset: the first ``n`` samples of the valid split (same on every rank)."""
    from llara_dist.data.shards import read_split

    return list(islice(read_split(shard_dir, "valid"), n))


def validate_in_training(
    model,
    tokenizer,
    samples: Sequence[dict],
    titles: Sequence[str],
    item_table: torch.Tensor,
    settings: EvalSettings,
    *,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """HitRatio@1 and ValidRatio of ``model`` on ``samples``, computed jointly by all ranks.

    Every rank must call this at the same step with the same ``samples`` (e.g.
    ``validation_subset(shards, cfg.train.valid_samples)``). ``model`` is the ``LlaraModel``
    (``engine.module`` under DeepSpeed); its train/eval mode is restored afterwards.
    Returns ``{"hit_ratio@1", "valid_ratio", "n"}``, identical on every rank.
    """
    import torch.distributed as dist

    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    part = list(samples[rank::world_size])
    per_rank = math.ceil(len(samples) / world_size)
    padded = part + [samples[0]] * (per_rank - len(part))
    device = next(model.parameters()).device
    rows = evaluate_samples(model, tokenizer, padded, titles, item_table, settings, sync_ranks=distributed)[: len(part)]
    counts = torch.tensor([sum(r["valid"] for r in rows), sum(r["correct"] for r in rows), len(rows)],
                          dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    valid, correct, n = (float(x) for x in counts.tolist())
    return {"hit_ratio@1": correct / n if n else 0.0, "valid_ratio": valid / n if n else 0.0, "n": int(n)}
