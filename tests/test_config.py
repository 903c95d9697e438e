from pathlib import Path

import pytest

from llara_dist.config import Config, load_config, save_config, worker_range
from llara_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_config_loads_with_overrides():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["prepare.num_candidates=21", "scaling.num_workers=[1,3]"])
    assert cfg.prepare.num_candidates == 21
    assert worker_range(cfg) == (1, 3)
    assert cfg.lora.r == 8


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "train.learning_rate" in msg and "unknown key" in msg and "lr" in msg


def test_wrong_type_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.lr.*fast"):
        load_config(p)


def test_override_errors():
    with pytest.raises(ConfigError, match="data.num_cand"):
        load_config(None, ["data.num_cand=3"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["novalue"])
    with pytest.raises(ConfigError, match="curriculum"):
        load_config(None, ["train.curriculum=cubic"])
    assert load_config(None, ["train.curriculum=two_stage(5)"]).train.curriculum == "two_stage(5)"


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_roundtrip(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["scaling.num_workers=[1,2]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(Config().scaling.num_workers, int)
