"""Answer matching and metrics: HitRatio@1, ValidRatio, ranking metrics, Wilson intervals.

Matching follows the LLaRA paper (lower-cased substring search of the candidate titles in the
generated text) with one deliberate addition for titles that contain another candidate's title
("Toy Story" inside "Toy Story 2"):

1. Output and titles are lower-cased and runs of whitespace collapsed to one space.
2. Every occurrence of every candidate title in the output is a span (start, end).
3. A span lying inside a *longer* matched span is discarded: "toy story 2" explains the
   "toy story" it contains, so that output names one title, not two.
4. The output is **valid** iff the surviving spans name exactly one distinct title; **correct** iff
   valid and that title is the target's title. "Toy Story 2, or Toy Story" names two (the second
   "toy story" is not inside a longer span) and is invalid. Candidates with identical titles
   cannot be told apart, so they count as one title and a match is correct if the target has it.

Ranking metrics (score decoding, the recommender, popularity) break ties by expectation: a target
tied with t other candidates, below g candidates, is at a uniformly random rank in g+1 .. g+t+1.
Constant scores therefore get the chance level (1/C for HR@1), never a lucky or unlucky order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace: the form in which titles are searched for."""
    return _WS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class Match:
    """The verdict on one generated answer."""

    matched: str | None  # the single title named (original spelling), None if not valid
    valid: bool
    correct: bool
    n_titles: int  # distinct candidate titles named after discarding contained spans


def find_titles(text: str, titles: Sequence[str]) -> list[str]:
    """Distinct normalised titles named in ``text`` after the contained-span rule (rule 3)."""
    out = normalize(text)
    spans: list[tuple[int, int, str]] = []
    for title in {normalize(t) for t in titles}:
        if not title:
            continue  # an empty title would "occur" everywhere
        start = out.find(title)
        while start != -1:
            spans.append((start, start + len(title), title))
            start = out.find(title, start + 1)
    kept = {
        t
        for (s, e, t) in spans
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for (s2, e2, _) in spans)
    }
    return sorted(kept)


def match_answer(text: str, candidate_titles: Sequence[str], target_title: str) -> Match:
    """Apply the matching rules (module docstring) to one generated answer."""
    named = find_titles(text, candidate_titles)
    if len(named) != 1:
        return Match(matched=None, valid=False, correct=False, n_titles=len(named))
    original = next(t for t in candidate_titles if normalize(t) == named[0])
    return Match(matched=original, valid=True, correct=named[0] == normalize(target_title), n_titles=1)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% for z=1.96); (0, 1) when n == 0.

    ``successes`` may be fractional (expected hits under tie-breaking by expectation).
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rank_bounds(scores: np.ndarray, target_index: int) -> tuple[int, int]:
    """(g, t): candidates scored strictly above the target, and tied with it (itself excluded)."""
    s = scores[target_index]
    greater = int(np.sum(scores > s))
    ties = int(np.sum(scores == s)) - 1
    return greater, ties


def expected_hit(scores: np.ndarray, target_index: int, k: int) -> float:
    """P(target in the top k) with ties broken uniformly at random."""
    g, t = _rank_bounds(np.asarray(scores), target_index)
    return float(min(max((k - g) / (t + 1), 0.0), 1.0))


def expected_ndcg(scores: np.ndarray, target_index: int, k: int) -> float:
    """Expected NDCG@k of the single relevant item with ties broken uniformly at random."""
    g, t = _rank_bounds(np.asarray(scores), target_index)
    gains = [1.0 / math.log2(r + 1) for r in range(g + 1, g + t + 2) if r <= k]
    return float(sum(gains) / (t + 1))


def ranking_metrics(score_rows: Iterable[np.ndarray], target_indices: Iterable[int]) -> dict[str, float]:
    """HR@1, HR@5, NDCG@5, NDCG@10 (means over samples) with a Wilson interval for HR@1."""
    hr1, hr5, n5, n10 = [], [], [], []
    for scores, ti in zip(score_rows, target_indices):
        scores = np.asarray(scores, dtype=np.float64)
        hr1.append(expected_hit(scores, ti, 1))
        hr5.append(expected_hit(scores, ti, 5))
        n5.append(expected_ndcg(scores, ti, 5))
        n10.append(expected_ndcg(scores, ti, 10))
    n = len(hr1)
    mean = (lambda xs: float(np.mean(xs)) if xs else 0.0)
    return {
        "hit_ratio@1": mean(hr1),
        "hit_ratio@1_ci95": list(wilson_interval(sum(hr1), n)),
        "hit_ratio@5": mean(hr5),
        "ndcg@5": mean(n5),
        "ndcg@10": mean(n10),
        "n": n,
    }


def generation_metrics(valid: Sequence[bool], correct: Sequence[bool]) -> dict[str, float]:
    """The paper's metrics over all samples, each with a Wilson 95% interval.

    ``hit_ratio@1`` = correct / all samples (what the paper reports); ``valid_ratio`` = valid / all;
    ``hit_ratio@1_among_valid`` = correct / valid (0 when nothing is valid).
    """
    n, n_valid, n_correct = len(valid), int(sum(valid)), int(sum(correct))
    return {
        "hit_ratio@1": n_correct / n if n else 0.0,
        "hit_ratio@1_ci95": list(wilson_interval(n_correct, n)),
        "valid_ratio": n_valid / n if n else 0.0,
        "valid_ratio_ci95": list(wilson_interval(n_valid, n)),
        "hit_ratio@1_among_valid": n_correct / n_valid if n_valid else 0.0,
        "hit_ratio@1_among_valid_ci95": list(wilson_interval(n_correct, n_valid)),
        "n": n,
        "n_valid": n_valid,
        "n_correct": n_correct,
    }
