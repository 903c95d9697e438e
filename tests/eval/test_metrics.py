"""Answer-matching rules and metric formulas on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llara_dist.eval.metrics import (
    expected_hit,
    expected_ndcg,
    generation_metrics,
    match_answer,
    ranking_metrics,
    wilson_interval,
)

CANDS = ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Casino (1995)"]


def test_exact_and_case_insensitive_match():
    m = match_answer("  heat (1995)\n", CANDS, "Heat (1995)")
    assert (m.valid, m.correct, m.matched) == (True, True, "Heat (1995)")
    m = match_answer("I'd pick CASINO (1995).", CANDS, "Heat (1995)")
    assert (m.valid, m.correct, m.matched) == (True, False, "Casino (1995)")


def test_empty_and_no_match_are_invalid():
    for text in ["", "   ", "Jumanji (1995)"]:
        m = match_answer(text, CANDS, "Heat (1995)")
        assert not m.valid and not m.correct and m.matched is None and m.n_titles == 0


def test_two_titles_named_is_invalid_even_if_one_is_the_target():
    m = match_answer("Heat (1995) or Casino (1995)", CANDS, "Heat (1995)")
    assert not m.valid and not m.correct and m.n_titles == 2


def test_title_contained_in_a_longer_candidate_title():
    # Candidate titles without years, so "toy story" really is inside "toy story 2".
    cands = ["Toy Story", "Toy Story 2", "Heat"]
    m = match_answer("Toy Story 2", cands, "Toy Story 2")
    assert (m.valid, m.correct, m.matched) == (True, True, "Toy Story 2")
    m = match_answer("Toy Story 2", cands, "Toy Story")
    assert m.valid and not m.correct
    # Named separately, the shorter title is a second answer.
    m = match_answer("Toy Story 2 and Toy Story", cands, "Toy Story 2")
    assert not m.valid and m.n_titles == 2
    m = match_answer("toy   story", cands, "Toy Story")
    assert m.valid and m.correct


def test_repeated_single_title_is_valid_and_whitespace_collapsed():
    m = match_answer("Heat  (1995) ... heat (1995)", CANDS, "Heat (1995)")
    assert m.valid and m.correct


def test_identical_candidate_titles_count_as_one():
    m = match_answer("Heat", ["Heat", "Heat", "Casino"], "Heat")
    assert m.valid and m.correct


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_generation_metrics():
    m = generation_metrics([True, True, False, True], [True, False, False, False])
    assert m["hit_ratio@1"] == 0.25 and m["valid_ratio"] == 0.75
    assert m["hit_ratio@1_among_valid"] == pytest.approx(1 / 3)
    assert m["n"] == 4 and m["hit_ratio@1_ci95"][0] < 0.25 < m["hit_ratio@1_ci95"][1]


def test_ranking_metrics_and_ties_by_expectation():
    # Target (index 2) ranked 3rd of 4, no ties.
    s = np.array([0.9, 0.8, 0.5, 0.1])
    assert expected_hit(s, 2, 1) == 0.0 and expected_hit(s, 2, 5) == 1.0
    assert expected_ndcg(s, 2, 5) == pytest.approx(1 / math.log2(4))
    # Constant scores over 4 candidates: chance level, whatever the target's position.
    c = np.zeros(4)
    for ti in range(4):
        assert expected_hit(c, ti, 1) == pytest.approx(0.25)
        assert expected_ndcg(c, ti, 10) == pytest.approx(np.mean([1 / math.log2(r + 1) for r in range(1, 5)]))
    m = ranking_metrics([s, np.array([0.0, 1.0, 0.2, 0.3])], [2, 1])
    assert m["hit_ratio@1"] == 0.5 and m["hit_ratio@5"] == 1.0 and m["n"] == 2
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1.0) / 2)
