"""The README's tiny-config job command on a two-node cluster: a head and a second node started as
separate `ray start` processes on loopback, the job submitted with the Ray job CLI and the
working directory uploaded, two 1-CPU workers (one per node: each node has one CPU), checkpoints
in a directory both nodes see, then resumed by a second submission.

Free non-default ports and its own temp dir, so it never meets another Ray cluster on the machine;
stopped by killing exactly the processes it started (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.test_job_submit import _free_ports, _ray_bin, stop_process_trees, submit_job

# Opt-in (about 100 s on 2 cores; the default suite is at its 15-minute budget): LLARA_MULTINODE=1.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("LLARA_MULTINODE"),
                                                   reason="set LLARA_MULTINODE=1 (two ray start nodes, two job submissions)")]
ROOT = Path(__file__).resolve().parents[2]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([_ray_bin(), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--disable-usage-stats", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _node_ports() -> list[str]:
    nm, om, agent, agent_grpc, metrics, rt_env, lo = _free_ports(7)
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 100}"]


@pytest.fixture
def two_node_cluster(tmp_path):
    gcs, dash, client = _free_ports(3)
    temp_dir = Path("/tmp") / f"llara-mn-{os.getpid()}-{gcs}"  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    procs = [_start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                     *_node_ports()], env, tmp_path / "head.log")]
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while subprocess.run([_ray_bin(), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        procs.append(_start([f"--address=127.0.0.1:{gcs}", *_node_ports()], env, tmp_path / "node2.log"))
        while True:  # both nodes registered with the GCS
            status = subprocess.run([_ray_bin(), "status", f"--address=127.0.0.1:{gcs}"], env=env,
                                    capture_output=True, text=True)
            if len(re.findall(r"^\s*1 node_", status.stdout, re.M)) >= 2 or "2.0 CPU" in status.stdout \
                    or "0.0/2.0 CPU" in status.stdout:
                break
            assert time.time() < deadline and procs[1].poll() is None, \
                (tmp_path / "node2.log").read_text()[-3000:] + status.stdout + status.stderr
            time.sleep(2)
        yield address, env
    finally:
        stop_process_trees(procs[::-1])


def test_readme_tiny_job_on_two_nodes_checkpoints_and_resumes(two_node_cluster, tiny_shards, tiny_rec, tmp_path):
    address, env = two_node_cluster
    run_dir = tmp_path / "run"  # one filesystem here: a path both nodes see

    def submit(*extra: str) -> str:
        # The README's command with the address and paths filled in.
        cmd = [_ray_bin(), "job", "submit", "--address", address, "--runtime-env",
               str(ROOT / "launcher/runtime_env.yaml"), "--working-dir", str(ROOT), "--",
               sys.executable, "launcher/train_job.py", "--config", "configs/tiny.yaml",
               f"data.shards={tiny_shards}", f"train.rec_dir={tiny_rec}", f"run_dir={run_dir}",
               "scaling.num_workers=2", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", *extra]
        proc = submit_job(cmd, env, timeout=600, cwd=ROOT)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in out.lower(), out[-5000:]
        return out

    submit("train.stop_after_steps=2")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (run_dir / "final").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["world_size"] == 2 for r in rows)  # two 1-CPU workers on two 1-CPU nodes: one each

    second = submit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # continued at step 3, not restarted
    assert "stopped at step 2" not in second
    assert (run_dir / "final/adapter/adapter_model.safetensors").is_file()
