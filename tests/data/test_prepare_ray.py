"""`prepare --engine ray` on a real two-node Ray cluster writes the local engine's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llara_dist.data.prepare import run_prepare
from llara_dist.data.shards import load_meta, read_split

from ..conftest import tiny_config


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.timeout(600)
def test_ray_engine_on_two_nodes_matches_the_local_engine(tmp_path, capsys):
    import ray
    from ray.cluster_utils import Cluster

    args = ("prepare.users=80", "prepare.items=60", "prepare.samples_per_shard=150")
    run_prepare(tiny_config(f"prepare.out={tmp_path / 'local'}", *args, "prepare.engine=local"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        capsys.readouterr()
        # engine "auto" (the default) picks Ray on a multi-node cluster
        run_prepare(tiny_config(f"prepare.out={tmp_path / 'ray'}", *args))
        assert "shards written by tasks on 2 node(s)" in capsys.readouterr().out
        # a pyarrow.fs URI as the output, with gzip shards
        uri = f"file://{tmp_path / 'uri'}"
        run_prepare(tiny_config(f"prepare.out={uri}", *args, "prepare.engine=ray", "prepare.compression=gzip"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    local = _files(tmp_path / "local")
    assert len([n for n in local if n.startswith("train-")]) >= 5
    assert _files(tmp_path / "ray") == local  # every shard, items.jsonl and meta.json, byte for byte
    run_prepare(tiny_config(f"prepare.out={tmp_path / 'local_gz'}", *args, "prepare.engine=local",
                            "prepare.compression=gzip"))
    assert _files(tmp_path / "uri") == _files(tmp_path / "local_gz")
    assert sum(1 for _ in read_split(tmp_path / "uri", "train")) == load_meta(tmp_path / "uri")["counts"]["train"]
