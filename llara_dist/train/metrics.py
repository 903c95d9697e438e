"""Rank 0's training log: ``RUN/metrics.jsonl`` (one JSON object per report) and TensorBoard under ``RUN/tb``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL + TensorBoard scalars; a no-op on ranks other than 0.

    On resume the rows written after the checkpoint we resumed from are dropped first, so the file
    reads as one run: those steps are trained again and logged again.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep the JSONL log regardless
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line from a killed process
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("valid") else key, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
