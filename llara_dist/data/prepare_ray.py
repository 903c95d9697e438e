"""`llara-dist prepare --engine ray`: shard writing as a Ray Data pipeline across a cluster.

The driver reads the log with the same Arrow reader as the local engine and plans the splits (the
flat per-user arrays and the int64 target index: vectorised, a few seconds at 20M interactions).
The expensive part -- building each sample's window, drawing its candidates, encoding and hashing
the tar, writing it -- runs as a Ray Data `map_batches` over the shard list, one shard per row,
on every node, reading the arrays from the object store. Each shard is a pure function of
(arrays, its slice of targets, seed), so the bytes are the local engine's whatever the cluster.

The output is a local path every node sees (shared storage) or a ``pyarrow.fs`` URI
(``s3://bucket/prefix``, ``gs://...``, ``file:///...``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llara_dist.config import PrepareConfig
from llara_dist.data.prepare import SPLITS, clean_stale, finish, load_source, plan, write_bytes, write_shard
from llara_dist.data.shards import COMPRESSIONS


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    return ray


def _prepare_out(out: str) -> None:
    if "://" in out:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(out)
        fs.create_dir(root, recursive=True)
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.base_name
            if name.split("-")[0] in SPLITS and name.endswith(tuple(COMPRESSIONS.values())):
                fs.delete_file(info.path)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        clean_stale(Path(out))


def prepare_ray(p: PrepareConfig) -> dict:
    """The Ray engine of `run_prepare`; returns the meta (identical to the local engine's)."""
    ray = _ensure_ray()
    import ray.data

    data = load_source(p)
    pl = plan(data, p)
    out = p.out
    _prepare_out(out)
    spec_ref, index_ref = ray.put(pl.spec), ray.put(pl.index)
    S = p.samples_per_shard
    rows = [{"task": i, "split": split, "shard": k, "start": k * S, "stop": k * S + len(targets)}
            for i, (_, split, k, targets) in enumerate(pl.tasks(out))]

    def write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, index = ray.get(spec_ref), ray.get(index_ref)
        result: dict[str, list] = {"task": [], "name": [], "sha256": [], "samples": [],
                                   "target_in_history": [], "shortcut": [], "node": []}
        node = ray.get_runtime_context().get_node_id()
        for task, split, shard, a, b in zip(batch["task"], batch["split"], batch["shard"], batch["start"],
                                            batch["stop"]):
            entry, stats = write_shard(spec, out, str(split), int(shard), index[str(split)][int(a):int(b)])
            result["task"].append(int(task))
            result["node"].append(node)
            for k in ("name", "sha256", "samples"):
                result[k].append(entry[k])
            for k in ("target_in_history", "shortcut"):
                result[k].append(stats[k])
        return {k: np.array(v) for k, v in result.items()}

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * cpus))
    # SPREAD: one shard per task, spread over the nodes rather than packed onto the first one
    done = ds.map_batches(write, batch_size=1, batch_format="numpy", num_cpus=1,
                          scheduling_strategy="SPREAD").take_all()
    print(f"ray engine: {len(done)} shards written by tasks on {len({str(r['node']) for r in done})} node(s)")
    done.sort(key=lambda r: int(r["task"]))  # the task order is the local engine's shard order
    results = [({"name": str(r["name"]), "sha256": str(r["sha256"]), "samples": int(r["samples"])},
                {"target_in_history": int(r["target_in_history"]), "shortcut": int(r["shortcut"])}) for r in done]
    return finish(data, p, pl, results, lambda name, b: write_bytes(out, name, b))

