"""Ray job entrypoint: `llara-dist train` inside a job submitted to a running cluster.

    ray job submit --address http://HEAD:8265 --runtime-env launcher/runtime_env.yaml \
        -- python launcher/train_job.py --config configs/movielens.yaml run_dir=/mnt/shared/runs/ml

The job's driver runs on the head node with RAY_ADDRESS set by Ray, so `llara-dist train` joins
the cluster instead of starting one. `run_dir` (or `ray.storage_path`) must be a path every node
sees (NFS), or set `ray.storage_path` to a cloud URI (s3://...) for the checkpoints.
"""

from __future__ import annotations

import os
import sys

from llara_dist.cli import main

if __name__ == "__main__":
    if not os.environ.get("RAY_ADDRESS"):
        print("train_job.py: RAY_ADDRESS is not set; run this through `ray job submit` "
              "(or use `llara-dist train` directly)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["train", *sys.argv[1:]]))
