"""The README's main command, `llara-dist demo`, end to end on a smaller synthetic set."""

import csv
import json
from itertools import islice

import pytest

from llara_dist.cli import main
from llara_dist.data.shards import load_titles, read_split
from llara_dist.eval.metrics import match_answer


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--workers", "2", "prepare.users=150", "prepare.items=100",
               "rec.epochs=3", "pretrain.steps=10", "train.max_steps=6", "train.log_every=3",
               "train.checkpoint_every=6", "eval.max_samples=24", "eval.max_new_tokens=8"])
    assert rc == 0
    # Every stage left its artefact where the README says.
    assert (out / "shards" / "meta.json").is_file()
    assert (out / "rec" / "item_embeddings.safetensors").is_file()
    assert (out / "warm_base" / "config.json").is_file()
    final = out / "run" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    llara_cfg = json.loads((final / "llara_config.json").read_text())
    assert str(out / "warm_base") in json.dumps(llara_cfg)  # trained on the warm local checkpoint
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    metrics = json.loads((out / "run" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n"] == 24
    # The metrics are what the predictions say: each generated answer matched again against its
    # candidates' titles, the first 24 test samples in stored order.
    with open(out / "run" / "eval" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    titles = load_titles(out / "shards")
    assert [r["key"] for r in rows] == [s["key"] for s in islice(read_split(out / "shards", "test"), 24)]
    matches = [match_answer(r["generated"], [titles[int(c)] for c in r["candidates"].split()], r["target_title"])
               for r in rows]
    assert [int(r["valid"]) for r in rows] == [int(m.valid) for m in matches]
    assert [int(r["correct"]) for r in rows] == [int(m.correct) for m in matches]
    assert metrics["hit_ratio@1"] == pytest.approx(sum(m.correct for m in matches) / 24)
    assert metrics["valid_ratio"] == pytest.approx(sum(m.valid for m in matches) / 24)
    assert metrics["recommender"]["hit_ratio@1"] > metrics["popularity"]["hit_ratio@1"]
    assert "demo finished" in capsys.readouterr().out
