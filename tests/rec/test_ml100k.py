"""MovieLens-100K target (issue 3): SASRec HR@1 >= 0.34 on the 943 test users' stored candidates
and clearly above popularity. Minutes of CPU, so not in the default suite: LLARA_REALDATA=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llara_dist.config import load_config
from llara_dist.data.prepare import run_prepare
from llara_dist.recommender.train import run_train_rec

ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"


@pytest.mark.realdata
@pytest.mark.skipif(not ML100K.is_dir() or not os.environ.get("LLARA_REALDATA"),
                    reason="set LLARA_REALDATA=1 with ../shared/data/ml-100k present")
def test_sasrec_movielens_100k(tmp_path):
    shards = tmp_path / "shards"
    run_prepare(load_config(None, ["prepare.format=recbole", f"prepare.input={ML100K}", f"prepare.out={shards}"]))
    m = run_train_rec(load_config(None, [f"data.shards={shards}", f"rec.out={tmp_path / 'rec'}", "rec.model=sasrec",
                                         "rec.epochs=10", "rec.patience=3"]), progress=False)
    assert m["test"]["n"] == 943
    assert m["test"]["hr@1"] >= 0.34, m["test"]
    assert m["test"]["hr@1"] >= m["popularity"]["test"]["hr@1"] + 0.1, (m["test"], m["popularity"])
