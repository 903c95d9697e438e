"""The hybrid-prompt curriculum: is optimiser step ``s`` trained on hybrid or text-only prompts?

LLaRA's curriculum makes step ``s`` hybrid with probability ``p = s / total_steps``. The decision
here is a pure function of (seed, step): every rank draws the same answer without communicating,
and a resumed run (even on another world size) continues the exact same sequence. The original
kept a counter inside each DataLoader worker, which restarted with the process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llara_dist.config import parse_curriculum


@dataclass(frozen=True)
class Curriculum:
    kind: str  # linear | hybrid_only | text_only | two_stage
    total_steps: int
    seed: int
    stage_steps: int = 0  # two_stage(k): the first k steps are text-only, the rest hybrid

    @classmethod
    def parse(cls, spec: str, total_steps: int, seed: int) -> "Curriculum":
        try:
            kind, stage_steps = parse_curriculum(spec)
        except ValueError as e:
            raise ValueError(f"train.curriculum: {e}") from None
        return cls(kind=kind, total_steps=max(1, total_steps), seed=seed, stage_steps=stage_steps)

    def hybrid_probability(self, step: int) -> float:
        """Probability that 0-based optimiser step ``step`` is hybrid."""
        if self.kind == "hybrid_only":
            return 1.0
        if self.kind == "text_only":
            return 0.0
        if self.kind == "two_stage":
            return 1.0 if step >= self.stage_steps else 0.0
        return min(1.0, step / self.total_steps)

    def is_hybrid(self, step: int) -> bool:
        p = self.hybrid_probability(step)
        if p <= 0.0 or p >= 1.0:
            return p >= 1.0
        # A fresh generator per (seed, step): no state to save, identical on every rank.
        return bool(np.random.default_rng([self.seed, step, 0x11A4A]).random() < p)
