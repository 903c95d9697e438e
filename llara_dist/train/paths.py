"""The run's paths on a cluster: resolved once on the driver, then checked on every node.

Workers run wherever Ray places them, with another working directory than the driver's, so every
path they read is made absolute on the driver before it is sent (`resolve_paths`). On a cluster of
several nodes each path must also exist *there*: a path on the head's local disk, or a relative
path into a `ray job submit` working directory that did not upload it (`launcher/runtime_env.yaml`
leaves `shards/` and `runs/` out), would otherwise fail minutes later inside a worker.
`check_paths_on_nodes` asks every node in one short Ray task each and fails up front with one line
naming the key and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from llara_dist.config import Config
from llara_dist.errors import ConfigError

# (config key, what a worker reads under it): the files whose presence proves the path is the one
# the driver checked. train.rec_dir is absent: the item table travels through the object store.
_WORKER_PATHS = (("data.shards", "meta.json"), ("model.name_or_path", "config.json"), ("run_dir", "."))


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(cfg: Config) -> tuple[Config, set[str]]:
    """``cfg`` with every local path key absolute (against the driver's working directory), and the
    keys that were relative."""
    relative: set[str] = set()

    def absolute(key: str, value: str | None) -> str | None:
        if value is None or _is_uri(value) or (key == "model.name_or_path" and value == "tiny"):
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            relative.add(key)
        return str(path.resolve())

    updates = {
        "run_dir": absolute("run_dir", cfg.run_dir),
        "data": cfg.data.model_copy(update={"shards": absolute("data.shards", cfg.data.shards)}),
        "train": cfg.train.model_copy(update={"rec_dir": absolute("train.rec_dir", cfg.train.rec_dir)}),
        "model": cfg.model.model_copy(update={"name_or_path": absolute("model.name_or_path", cfg.model.name_or_path)}),
        "ray": cfg.ray.model_copy(update={"storage_path": absolute("ray.storage_path", cfg.ray.storage_path)}),
    }
    return cfg.model_copy(update=updates), relative


def worker_paths(cfg: Config) -> dict[str, str]:
    """Config key -> the file a worker on any node must be able to open under it."""
    values = {"data.shards": cfg.data.shards, "model.name_or_path": cfg.model.name_or_path, "run_dir": cfg.run_dir}
    if cfg.ray.storage_path and not _is_uri(cfg.ray.storage_path):
        values["ray.storage_path"] = cfg.ray.storage_path
    marker = dict(_WORKER_PATHS)
    return {key: os.path.normpath(os.path.join(value, marker.get(key, ".")))
            for key, value in values.items()
            if value and not _is_uri(value) and not (key == "model.name_or_path" and value == "tiny")}


def _missing(paths: dict[str, str]) -> tuple[str, list[str]]:
    """(this node's IP, the keys whose file is not there): runs as a Ray task on each node."""
    import ray

    return ray.util.get_node_ip_address(), [key for key, path in paths.items() if not os.path.exists(path)]


def check_paths_on_nodes(cfg: Config, relative: set[str] = frozenset(), *, timeout_s: float = 60.0) -> int:
    """Check on every alive node of the connected Ray cluster that the workers' paths exist there;
    returns the number of nodes checked. Raises one ConfigError naming the first key missing."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = worker_paths(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not paths or len(nodes) < 2:
        return len(nodes)  # one node: the driver's own checks saw the same filesystem
    task = ray.remote(num_cpus=0)(_missing)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes]
    results = ray.get(refs, timeout=timeout_s)
    for key in paths:
        lacking = [ip for ip, missing in results if key in missing]
        if not lacking:
            continue
        where = f"node {lacking[0]}" + (f" and {len(lacking) - 1} other(s)" if len(lacking) > 1 else "")
        hint = ("a path every node mounts (NFS or a shared volume)"
                + (" or a pyarrow URI (s3://, gs://)" if key == "data.shards" else "")
                + (", or ray.storage_path as a URI (s3://...) for checkpoints" if key in ("run_dir", "ray.storage_path")
                   else ""))
        rel = (" It was a relative path, resolved against the driver's working directory; `ray job submit` "
               "uploads the working directory without shards/ and runs/ (launcher/runtime_env.yaml)."
               if key in relative else "")
        raise ConfigError(f"{key}: {paths[key]} does not exist on {where} of {len(nodes)}, where workers run; "
                          f"use {hint}.{rel}")
    return len(nodes)
