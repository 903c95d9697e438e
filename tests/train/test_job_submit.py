"""A tiny training job submitted with the Ray job CLI to a local head on loopback.

The head uses free, non-default ports and its own temp dir so it never meets another Ray cluster on
the machine; it is stopped by killing exactly the processes this test started (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def submit_job(cmd: list[str], env: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (the job server
    answers `ray job list` before its agent takes submissions: "No available agent")."""
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            return proc
        time.sleep(3)


def stop_process_trees(procs: list[subprocess.Popen]) -> None:
    """Exactly the processes a test started (`ray start --block` and their trees), never `ray stop`."""
    import psutil

    tree = []
    for proc in procs:
        if proc.poll() is None:
            tree += [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env = _free_ports(9)
    lo = _free_ports(1)[0]
    temp_dir = Path("/tmp") / f"llara-ray-{os.getpid()}-{lo}"  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [_ray_bin(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rt_env}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 200}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job server answers once the dashboard is up
            probe = subprocess.run([_ray_bin(), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if time.time() > deadline or head.poll() is not None:
                raise AssertionError(f"ray head did not come up:\n{(tmp_path / 'head.log').read_text()[-3000:]}"
                                     f"\n{probe.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        stop_process_trees([head])
        head.wait(timeout=30)


def test_ray_job_submit_runs_training(ray_head, tiny_shards, tiny_rec, tmp_path):
    address, env = ray_head
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    run_dir = tmp_path / "run"
    (job_dir / "job.yaml").write_text((ROOT / "configs/tiny.yaml").read_text())
    cmd = [_ray_bin(), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--",
           sys.executable, str(ROOT / "launcher/train_job.py"), "--config", "job.yaml",
           f"data.shards={tiny_shards}", f"train.rec_dir={tiny_rec}", f"run_dir={run_dir}",
           "scaling.num_workers=1", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1"]
    proc = submit_job(cmd, env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "final/adapter/adapter_model.safetensors").is_file()
