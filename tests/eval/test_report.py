"""`llara-dist report` on a hand-made run directory."""

from __future__ import annotations

import json

import pytest

from llara_dist.cli import main
from llara_dist.errors import DataError
from llara_dist.eval.metrics import wilson_interval
from llara_dist.eval.report import run_report, series


def _metrics(hr: float, n: int, **extra) -> dict:
    return {"hit_ratio@1": hr, "hit_ratio@1_ci95": list(wilson_interval(hr * n, n)), "n": n, **extra}


def _make_run(tmp_path):
    run = tmp_path / "run"
    (run / "eval" / "test").mkdir(parents=True)
    log = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "hybrid_share": s / 10} for s in range(1, 11)]
    log += [{"step": 5, "valid/hit_ratio@1": 0.1, "valid/valid_ratio": 0.5}, {"step": 10, "valid/hit_ratio@1": 0.2}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    (run / "config.yaml").write_text("model: {name_or_path: tiny, dtype: float32}\ntrain: {lr: 0.001}\n")
    m = _metrics(0.25, 40, split="test", prompt="hybrid", decoding="free", valid_ratio=0.5,
                 **{"hit_ratio@1_among_valid": 0.5})
    m["recommender"] = _metrics(0.4, 40, model="sasrec")
    m["popularity"] = _metrics(0.1, 40)
    (run / "eval" / "test" / "metrics.json").write_text(json.dumps(m))
    return run


def test_report_writes_plots_and_summary(tmp_path):
    run = _make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    out = run / "report"
    for name in ("training.png", "hit_ratio.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    summary = (out / "summary.md").read_text()
    assert "| 0.250 [" in summary and "| 0.400 [" in summary and "| 0.100 [" in summary
    assert "| test | hybrid | free | 40 |" in summary
    assert "validation HitRatio@1: 0.1 at step 5 -> 0.2 at step 10 (best 0.2)" in summary
    # every series under the key the training worker writes (metrics.jsonl)
    assert "- loss: 3 at step 1 -> 0.3 at step 10" in summary
    assert "- learning rate: 0.001 at step 1 -> 0.001 at step 10" in summary
    assert "- hybrid share: 0.1 at step 1 -> 1 at step 10" in summary


def test_series_picks_last_finite_value_per_step():
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "loss": 1.5}, {"step": 2, "loss": float("nan")}, {"step": 3}]
    assert series(rows, "loss") == ([1], [1.5])


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="run directory not found"):
        run_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        run_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        run_report(bad)
