"""How every command reaches Ray (`train`, `evaluate`): one place, so both join clusters alike.

With an address (``ray.address`` or ``$RAY_ADDRESS``, which ``ray job submit`` sets) the command
joins that cluster and adds no runtime_env: inside a Ray job the job's own runtime_env already
applies and a second one would conflict. Without one it starts a private local cluster with
``address="local"``: a bare ``ray.init()`` would join whatever cluster ``ray start`` last left on
this machine, possibly another user's.
"""

from __future__ import annotations

import os

from llara_dist.config import Config


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables every Ray worker of a local cluster gets."""
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and fail on CPU nodes
    return env


def connect_ray(cfg: Config) -> bool:
    """Join the configured cluster or start a local one; True when this call started Ray (and
    the caller should ``ray.shutdown()`` it), False when Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", runtime_env={"env_vars": worker_env(cfg)}, include_dashboard=False,
                 log_to_driver=True)
    return True
