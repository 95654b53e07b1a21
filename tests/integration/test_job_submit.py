"""`ray start --head` on 127.0.0.1, then `ray job submit` of the demo job as the README says; the output must be there.

The cluster runs in its own process group (`ray start --block`), and is stopped by signalling that
group, never with `ray stop` (which would kill every Ray cluster on the machine).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workers.toyworld import WorldConfig, write_shards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_metrics_report_interval_ms="500")
    port, dash, agent, agent_grpc, metrics = free_port(), free_port(), free_port(), free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayt{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         # Own agent ports: the test session's ray.init runtime already holds the default agent port
         # (52365), and an agent that cannot bind it leaves the head with no agent to take jobs.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{address}/api/version", timeout=2).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                out = head.stdout.read().decode(errors="replace") if head.stdout else ""
                pytest.fail(f"ray head did not come up: {out[-2000:]}")
            time.sleep(1)
    yield address, env, metrics
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_the_demo_job(tmp_path, ray_head, model_dirs):
    """Exactly the README's command, from the repo root: `ray job submit --runtime-env jobs/cluster/runtime_env.yaml
    -- python -m pipeline run ...`. The entrypoint's plain `python` is the runtime env's virtualenv (on
    this machine's PATH, `python` has no pyarrow: without the runtime env the job fails on the import)."""
    address, env, metrics = ray_head
    base, glimpse = model_dirs
    write_shards(WorldConfig(seed=9, max_objects=3), 4, tmp_path / "in", rows_per_shard=2)
    out = tmp_path / "out"
    cmd = [
        RAY, "job", "submit", "--address", address, "--runtime-env", "jobs/cluster/runtime_env.yaml", "--",
        "python", "-m", "pipeline", "run", "jobs/demo.yaml",
        "--set", f"input.uri={tmp_path / 'in'}", "--set", f"output.uri={out}",
        "--set", f"model.base={base}", "--set", f"model.glimpse_modules={glimpse}", "--set", "sampling.max_new_tokens=3",
    ]
    deadline = time.monotonic() + 120  # the head's job agent can come up after its dashboard on a loaded machine
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent to submit job" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "output: 4 rows (4 ok, 0 error)" in done.stdout and "this run: 4 rows computed" in done.stdout
    assert "runtime_resources/pip" in done.stdout or "Runtime env is setting up" in done.stdout
    assert (out / "_SUCCESS").exists()
    rows = sum(pq.read_table(p).num_rows for p in out.glob("*.parquet"))
    assert rows == 4
    # The model stage's counters reach the cluster's Prometheus endpoint (what the Ray dashboard shows).
    seen, ok_rows, deadline = "", 0.0, time.monotonic() + 60
    while time.monotonic() < deadline and ok_rows < 4:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                seen = "\n".join(line for line in r.read().decode().splitlines() if "glimpse_batch_rows" in line)
        except OSError:
            pass
        ok_rows = sum(float(line.rsplit(" ", 1)[1]) for line in seen.splitlines()
                      if not line.startswith("#") and 'status="ok"' in line and 'job="demo"' in line)
        time.sleep(2)
    assert ok_rows == 4, seen
