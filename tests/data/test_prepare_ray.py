"""`prepare --engine ray` on a real two-node Ray cluster writes the local engine's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llara_dist.data.prepare import run_prepare
from llara_dist.data.shards import load_meta, read_split
from llara_dist.errors import DataError

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
        # Parquet part files: the read itself runs in Ray Data tasks, one per file
        parts = _parquet_parts(tmp_path / "parts")
        tab_args = ("prepare.format=parquet", f"prepare.input={parts}", "prepare.samples_per_shard=300",
                    "prepare.num_candidates=5", "prepare.drop_unknown=true")
        run_prepare(tiny_config(f"prepare.out={tmp_path / 'tab_ray'}", *tab_args, "prepare.engine=ray"))
        bad = tmp_path / "bad"
        bad.mkdir()
        pq.write_table(pa.table({"user_id": ["a", None], "item_id": [1, 2], "timestamp": [1.0, 2.0],
                                 "title": ["X", "Y"]}), bad / "p.parquet")
        with pytest.raises(DataError, match=r"p.parquet: row 2: user_id: expected a value"):
            run_prepare(tiny_config(f"prepare.out={tmp_path / 'bad_out'}", "prepare.format=parquet",
                                    f"prepare.input={bad}", "prepare.engine=ray"))
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
    run_prepare(tiny_config(f"prepare.out={tmp_path / 'tab_local'}", *tab_args, "prepare.engine=local"))
    assert _files(tmp_path / "tab_ray") == _files(tmp_path / "tab_local")
    assert load_meta(tmp_path / "tab_local")["filtered"]["unknown_item_interactions"] > 0


def _parquet_parts(d: Path) -> Path:
    """Three part files; timestamps with many ties (broken by input order across files) and some
    items without a title on their first row (dropped)."""
    rng = np.random.default_rng(0)
    n = 3000
    items = rng.integers(0, 80, n)
    table = pa.table({"user_id": np.char.add("u", rng.integers(0, 60, n).astype(str)), "item_id": items,
                      "timestamp": rng.integers(0, 50, n).astype(float),
                      "title": [f"Song {i}" if i % 17 else None for i in items.tolist()]})
    d.mkdir()
    for k in range(3):
        pq.write_table(table.slice(1000 * k, 1000), d / f"part-{k}.parquet")
    return d
