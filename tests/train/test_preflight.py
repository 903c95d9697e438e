"""Bad input to `llara-dist train` fails in seconds with one clear message, before any Ray worker starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llara_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _train(capsys, *args: str) -> str:
    import ray

    code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not ray.is_initialized()  # refused before connecting to Ray, let alone starting workers
    assert "Traceback" not in err
    return err


def _base(tiny_shards, tiny_rec, tmp_path) -> list[str]:
    return [f"data.shards={tiny_shards}", f"train.rec_dir={tiny_rec}", f"run_dir={tmp_path / 'run'}"]


def test_item_table_that_does_not_match_the_shards(tiny_shards, tiny_rec, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    rec = tmp_path / "rec"
    shutil.copytree(tiny_rec, rec)
    meta = json.loads((rec / "rec_meta.json").read_text())
    meta["shards_fingerprint"] = "0" * 64
    (rec / "rec_meta.json").write_text(json.dumps(meta))
    args = [f"data.shards={tiny_shards}", f"train.rec_dir={rec}", f"run_dir={tmp_path / 'run'}"]
    err = _train(capsys, *args)
    assert "rec_meta.json: shards_fingerprint 000000000000" in err and "train-rec" in err
    # A table with one row too few (another item vocabulary).
    tensors = load_file(rec / "item_embeddings.safetensors")
    save_file({k: v[:-1].contiguous() for k, v in tensors.items()}, rec / "item_embeddings.safetensors")
    err = _train(capsys, *args)
    assert "item_embeddings.safetensors: item table has shape" in err


def test_missing_model_path(tiny_shards, tiny_rec, tmp_path, capsys):
    err = _train(capsys, *_base(tiny_shards, tiny_rec, tmp_path), "model.name_or_path=/nonexistent/llama-7b")
    assert "model.name_or_path" in err and "/nonexistent/llama-7b" in err and "does not exist" in err


def test_ds_config_contradicting_the_yaml(tiny_shards, tiny_rec, tmp_path, capsys):
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["gradient_accumulation_steps"] = 8
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    err = _train(capsys, *_base(tiny_shards, tiny_rec, tmp_path), f"train.ds_config={path}")
    assert "ds.json: gradient_accumulation_steps is 8 but the YAML gives train.grad_accum = 1" in err


def test_corrupt_train_shard_is_named(tiny_shards, tiny_rec, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:700])  # truncated mid-record
    err = _train(capsys, f"data.shards={shards}", f"train.rec_dir={tiny_rec}", f"run_dir={tmp_path / 'run'}")
    assert victim.name in err and "skip_corrupt" in err


def test_too_few_samples_for_one_step(tiny_shards, tiny_rec, tmp_path, capsys):
    err = _train(capsys, *_base(tiny_shards, tiny_rec, tmp_path), "train.micro_batch_size=100000")
    assert "fewer than one optimiser step" in err and "train.micro_batch_size" in err


def test_resuming_a_run_with_other_data(tiny_shards, tiny_rec, tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    from llara_dist.config import load_config
    from llara_dist.train.checkpoint import TrainerState
    from llara_dist.train.run_state import make_plan

    cfg = load_config(ROOT / "configs/tiny.yaml", _base(tiny_shards, tiny_rec, tmp_path))
    plan = make_plan(cfg, 1000, "f" * 64)  # the run's plan, as its checkpoints record it
    state = TrainerState(step=10, world_size=2, tag="global_step10", stream={}, zero_stage=3, plan=plan.to_dict())
    (step / "trainer_state.json").write_text(state.to_json())
    err = _train(capsys, *_base(tiny_shards, tiny_rec, tmp_path))
    assert "step_00000010" in err and "fingerprint ffffffffffff" in err and "--run-dir" in err
