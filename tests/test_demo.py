"""The README's main command, `llara-dist demo`, end to end on a smaller synthetic set."""

import json

import pytest

from llara_dist.cli import main


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
    assert 0.0 <= metrics["hit_ratio@1"] <= metrics["valid_ratio"] <= 1.0
    assert metrics["recommender"]["hit_ratio@1"] > metrics["popularity"]["hit_ratio@1"]
    assert "demo finished" in capsys.readouterr().out
