"""Paths on a cluster: absolute before they travel, and checked on every node before workers start."""

from __future__ import annotations

import time

import pytest

from llara_dist.errors import ConfigError
from llara_dist.ray_session import connect_ray, worker_env
from llara_dist.train.paths import check_paths_on_nodes, resolve_paths, worker_paths
from tests.conftest import tiny_config


def test_relative_paths_are_resolved_once_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, relative = resolve_paths(tiny_config("data.shards=shards/x", "train.rec_dir=/abs/rec", "run_dir=runs/a",
                                              "ray.storage_path=s3://bucket/ckpt"))
    assert cfg.data.shards == str(tmp_path / "shards/x") and cfg.run_dir == str(tmp_path / "runs/a")
    assert cfg.train.rec_dir == "/abs/rec" and cfg.ray.storage_path == "s3://bucket/ckpt"  # URIs untouched
    assert cfg.model.name_or_path == "tiny"
    assert relative == {"data.shards", "run_dir"}
    # What workers must open: URIs and the tiny preset need no shared filesystem.
    assert worker_paths(cfg) == {"data.shards": str(tmp_path / "shards/x/meta.json"), "run_dir": str(tmp_path / "runs/a")}


def test_local_ray_workers_get_the_cpu_environment():
    cpu, gpu = worker_env(tiny_config()), worker_env(tiny_config("scaling.use_gpu=true"))
    assert cpu["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in gpu
    assert cpu["TOKENIZERS_PARALLELISM"] == gpu["TOKENIZERS_PARALLELISM"] == "false"


@pytest.mark.slow
def test_a_path_missing_on_the_nodes_fails_up_front_naming_the_key(tiny_shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        # The one way every command joins Ray: by the configured address, started here by no one else.
        joined = tiny_config(f"ray.address={cluster.address}")
        assert connect_ray(joined) is True and ray.get_runtime_context().gcs_address == cluster.address
        assert connect_ray(joined) is False  # already connected: the caller must not shut it down
        cluster.wait_for_nodes()
        (tmp_path / "run").mkdir()
        good, _ = resolve_paths(tiny_config(f"data.shards={tiny_shards}", f"run_dir={tmp_path / 'run'}"))
        assert check_paths_on_nodes(good) == 2  # both nodes asked, every path there
        bad, relative = resolve_paths(tiny_config(f"data.shards={tiny_shards}", f"run_dir={tmp_path / 'run'}",
                                                  f"model.name_or_path={tmp_path / 'nowhere'}"))
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"^model\.name_or_path: .*nowhere/config\.json does not exist on "
                                              r"node .* and 1 other\(s\) of 2, where workers run; use a path every "
                                              r"node mounts"):
            check_paths_on_nodes(bad, relative)
        assert time.monotonic() - t0 < 10
    finally:
        ray.shutdown()
        cluster.shutdown()
