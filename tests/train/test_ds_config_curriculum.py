"""Fast checks (no Ray, no DeepSpeed engine): DS config filling, curriculum draws, checkpoint validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llara_dist.config import load_config
from llara_dist.errors import CheckpointError, ConfigError
from llara_dist.train.checkpoint import TrainerState, find_resumable, validate_checkpoint, MANIFEST_DIR, STATE_FILE
from llara_dist.train.curriculum import Curriculum
from llara_dist.train.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", list(overrides))


@pytest.mark.parametrize("template", ["ds_configs/zero3.json", "ds_configs/zero3_offload.json", "ds_configs/zero2.json"])
def test_ds_config_filled_from_yaml(template):
    cfg = _cfg(f"train.ds_config={template}", "train.micro_batch_size=3", "train.grad_accum=5", "train.lr=2e-4",
               "train.weight_decay=0.05", "train.min_lr_ratio=0.01", "train.warmup_steps=7", "model.dtype=bfloat16")
    ds = build_ds_config(cfg, world_size=4, total_steps=100, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU run: nothing to JIT-compile
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"]) == (100, 7)
    assert sched["cos_min_ratio"] == sched["warmup_min_ratio"] == 0.01
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == (2 if "zero2" in template else 3)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
@pytest.mark.parametrize("template", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
@pytest.mark.parametrize("use_gpu", [True, False])
def test_every_shipped_config_fills_every_template_for_its_target(config, template, use_gpu):
    """The paper configs target GPUs: their templates must fill for use_gpu true as well as on CPU
    (the shipped templates once hard-coded torch_adam and refused every GPU run)."""
    cfg = load_config(ROOT / "configs" / config, [f"train.ds_config={ROOT / 'ds_configs' / template}",
                                                  f"scaling.use_gpu={use_gpu}"])
    ds = build_ds_config(cfg, world_size=8, total_steps=100, hidden_size=4096)
    params = ds["optimizer"]["params"]
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    # Default: torch's AdamW, nothing to JIT-compile (FusedAdam needs nvcc + CUDA_HOME).
    assert params["torch_adam"] is True
    assert params.get("fused", False) is (use_gpu and not offload)
    if offload:
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_deepspeed_optimizer_only_when_asked():
    cfg = load_config(ROOT / "configs/movielens.yaml", ["train.optimizer=deepspeed"])
    ds = build_ds_config(cfg, world_size=8, total_steps=100, hidden_size=4096)
    assert ds["optimizer"]["params"]["torch_adam"] is False and "fused" not in ds["optimizer"]["params"]


def test_ds_config_contradicting_yaml_is_refused(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["optimizer"]["params"]["lr"] = 1e-5
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"mine\.json: optimizer\.params\.lr is 1e-05 but the YAML gives train\.lr"):
        build_ds_config(_cfg(f"train.ds_config={p}"), world_size=2, total_steps=10, hidden_size=64)
    # An agreeing concrete value is fine.
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["train_batch_size"] = 8
    p.write_text(json.dumps(ds))
    assert build_ds_config(_cfg(f"train.ds_config={p}"), world_size=2, total_steps=10, hidden_size=64)["train_batch_size"] == 8
    with pytest.raises(ConfigError, match=r"train_batch_size is 8 but the YAML gives .* 3 workers"):
        build_ds_config(_cfg(f"train.ds_config={p}"), world_size=3, total_steps=10, hidden_size=64)


def test_ds_config_missing_or_broken(tmp_path):
    with pytest.raises(ConfigError, match="nope.json.*not found"):
        build_ds_config(_cfg("train.ds_config=nope.json"), world_size=1, total_steps=1, hidden_size=8)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        build_ds_config(_cfg(f"train.ds_config={bad}"), world_size=1, total_steps=1, hidden_size=8)


def test_curriculum_linear_follows_schedule_and_is_pure():
    cur = Curriculum.parse("linear", total_steps=2000, seed=3)
    draws = [cur.is_hybrid(s) for s in range(2000)]
    assert draws == [Curriculum.parse("linear", 2000, 3).is_hybrid(s) for s in range(2000)]  # same on every rank
    first, last = sum(draws[:500]) / 500, sum(draws[1500:]) / 500
    assert 0.05 < first < 0.20 and 0.80 < last < 0.95  # p = step / total: means 0.125 and 0.875
    assert draws != [Curriculum.parse("linear", 2000, 4).is_hybrid(s) for s in range(2000)]


def test_curriculum_kinds():
    assert all(Curriculum.parse("hybrid_only", 10, 0).is_hybrid(s) for s in range(10))
    assert not any(Curriculum.parse("text_only", 10, 0).is_hybrid(s) for s in range(10))
    two = Curriculum.parse("two_stage(4)", 10, 0)
    assert [two.is_hybrid(s) for s in range(10)] == [False] * 4 + [True] * 6
    with pytest.raises(ValueError, match="curriculum"):
        Curriculum.parse("cubic", 10, 0)


def _fake_checkpoint(path: Path, step: int, world_size: int = 2) -> None:
    state = TrainerState(step=step, world_size=world_size, tag=f"global_step{step}",
                         stream={"epoch": 0, "offset": 8 * step}, zero_stage=3)
    (path / state.tag).mkdir(parents=True)
    (path / MANIFEST_DIR).mkdir()
    (path / STATE_FILE).write_text(state.to_json())
    for r in range(world_size):
        f = path / state.tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        f.write_bytes(b"x" * (10 + r))
        (path / MANIFEST_DIR / f"rank_{r:05d}.json").write_text(json.dumps({"files": {f"{state.tag}/{f.name}": 10 + r}}))


def test_checkpoint_validation_and_fallback(tmp_path):
    for step in (5, 10):
        _fake_checkpoint(tmp_path / f"step_{step:08d}", step)
    latest = tmp_path / "step_00000010"
    assert validate_checkpoint(latest).step == 10
    (latest / "global_step10" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="rank 1's file .* is missing"):
        validate_checkpoint(latest)
    with pytest.warns(UserWarning, match="skipping an incomplete checkpoint.*rank 1.*resuming from step_00000005"):
        path, state = find_resumable(latest)
    assert Path(path).name == "step_00000005" and state.stream == {"epoch": 0, "offset": 40}
    # A truncated file is caught too; with nothing complete left the error says so.
    (tmp_path / "step_00000005" / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="(?s)no complete checkpoint.*truncated"):
        find_resumable(latest)
